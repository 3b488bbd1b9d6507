import { Emitter } from "./emitter.js";
import { ConnectedInfo, DisconnectedInfo, HeraldError, HistoryResult, MarkReadResult, Message, Position, PresenceResult, PublishResult, RecoveredInfo, ResyncInfo } from "./types.js";
/** The part of the WebSocket interface the client uses (browsers' and the `ws` package's). */
export interface WebSocketLike {
    readyState: number;
    binaryType: string;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((event: unknown) => void) | null;
    onmessage: ((event: {
        data: unknown;
    }) => void) | null;
    onclose: ((event: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((event: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;
/** Timers, replaceable so that tests can drive time by hand. */
export interface Clock {
    setTimeout(callback: () => void, ms: number): unknown;
    clearTimeout(handle: unknown): void;
    now(): number;
}
export interface ClientOptions {
    /** A JWT. Without `getToken`, the client stops when the server refuses it or it expires. */
    token?: string;
    /** Called for every connection and before the token expires; preferred over `token`. */
    getToken?: () => Promise<string> | string;
    /** The WebSocket implementation; defaults to `globalThis.WebSocket` (pass `ws`'s in Node 20). */
    WebSocket?: WebSocketConstructor;
    /** Reconnect back-off bounds, in milliseconds (default 500 and 20000). */
    minReconnectDelay?: number;
    maxReconnectDelay?: number;
    /** How long a command waits for its answer, in milliseconds (default 10000). */
    timeout?: number;
    /** Silence after which the client sends `ping`, in milliseconds (default 20000). */
    pingInterval?: number;
    /** How long the client waits for any frame after a `ping` before it reconnects (default 10000). */
    pongTimeout?: number;
    /** Commands held while disconnected; more are rejected with `queue_full` (default 100; 0 rejects at once). */
    maxQueuedCommands?: number;
    /** Refresh the token this long before its `exp`, at most (default 60000 ms; never earlier than 3/4 of its life). */
    refreshMargin?: number;
    /** Connect in the constructor (default true). */
    autoConnect?: boolean;
    /** Sources of time and randomness, for tests. */
    clock?: Clock;
    random?: () => number;
}
export type ClientState = "disconnected" | "connecting" | "connected";
export interface ClientEvents {
    [name: string]: unknown;
    connecting: {
        attempt: number;
    };
    connected: ConnectedInfo;
    disconnected: DisconnectedInfo;
    message: Message;
    /** An error that belongs to no command: `auth_failed`, a failed token refresh, an unsolicited `error`. */
    error: HeraldError;
    /** The server API subscribed or unsubscribed this connection. */
    subscribed: {
        channel: string;
    };
    unsubscribed: {
        channel: string;
        reason?: string;
    };
}
export interface SubscriptionEvents {
    [name: string]: unknown;
    message: Message;
    subscribed: {
        channel: string;
        position?: Position;
    };
    recovered: RecoveredInfo;
    resync: ResyncInfo;
    error: HeraldError;
}
/** A channel the client keeps subscribed, across reconnects, until `unsubscribe()`. */
export declare class Subscription extends Emitter<SubscriptionEvents> {
    readonly channel: string;
    /** The last position seen, in channels that keep history; used to recover. */
    position: Position | undefined;
    /** Whether the server has acknowledged the subscription on the current connection. */
    subscribed: boolean;
    private readonly client;
    /** @internal Use `client.subscribe(channel)`. */
    constructor(client: Client, channel: string, position?: Position);
    /** Stops the subscription: the server is told when connected, and no event follows. */
    unsubscribe(): Promise<void>;
    /** @internal */
    dispatch<K extends keyof SubscriptionEvents>(event: K, value: SubscriptionEvents[K]): void;
}
export declare class Client extends Emitter<ClientEvents> {
    readonly url: string;
    /** The current state; `connected` once the server has accepted the token. */
    state: ClientState;
    /** Set while connected. */
    info: ConnectedInfo | undefined;
    private readonly options;
    private readonly WebSocketImpl;
    private readonly getToken;
    private token;
    private readonly subscriptions;
    private readonly pending;
    /** Commands waiting for a connection, oldest first. */
    private queue;
    private nextMessageId;
    private socket;
    /** Whether the application wants a connection (between `connect()` and `disconnect()`). */
    private wanted;
    /** Failed attempts since the last successful connection. */
    private attempt;
    /** A token refused by the server: ask `getToken` for another before the next attempt. */
    private tokenRefused;
    private reconnectTimer;
    private silenceTimer;
    private pongTimer;
    private refreshTimer;
    private readonly onOnline;
    constructor(url: string, options?: ClientOptions);
    /** Starts connecting (and keeps reconnecting) until `disconnect()`. */
    connect(): void;
    /** Closes the connection and stops reconnecting; waiting commands are rejected. */
    disconnect(): void;
    /**
     * Subscribes to `channel` now or on the next connection, and again after every reconnect,
     * recovering from the last position in channels that keep history. `position` starts
     * from a position the application stored (e.g. across page loads).
     */
    subscribe(channel: string, options?: {
        position?: Position;
    }): Subscription;
    /** The subscription to `channel`, if any. */
    getSubscription(channel: string): Subscription | undefined;
    unsubscribe(channel: string): Promise<void>;
    /** Publishes `data` (any JSON value) to `channel`; resolves with the server's message id. */
    publish(channel: string, data: unknown, options?: {
        type?: string;
    }): Promise<PublishResult>;
    /** A page of the channel's kept messages (latest `limit`, or those after `offset`). */
    history(channel: string, options?: {
        limit?: number;
        offset?: number;
        epoch?: string;
    }): Promise<HistoryResult>;
    /** Who is subscribed to the channel, over every node. */
    presence(channel: string): Promise<PresenceResult>;
    /** Stores the read cursor for `channel` at `messageId`; the user's other connections get `read`. */
    markRead(channel: string, messageId: string, options?: {
        offset?: number;
    }): Promise<MarkReadResult>;
    /**
     * Sends any command and resolves with its `ack`'s `data` (or the `pong`'s); rejects with a
     * `HeraldError` on `error`, on timeout, or when the connection ends before the answer.
     * While disconnected, commands wait in a bounded queue (`maxQueuedCommands`) and their
     * timeout runs from the call.
     */
    command(type: string, data?: unknown): Promise<any>;
    /**
     * `command` with callbacks, which run as the answer is read: the subscription bookkeeping
     * must see a subscribe's ack before the deliveries that follow it in the same stream.
     */
    private request;
    private open;
    private currentToken;
    /** Forgets the socket (its late events are ignored) and closes it. */
    private dropSocket;
    /** The socket closed (or went silent): decide whether and when to reconnect. */
    private closed;
    private afterClose;
    private rejectInFlight;
    private fail;
    private sendCommand;
    private sendSubscribe;
    /**
     * Position bookkeeping for a subscribe's ack (docs/protocol.md §6): a fresh subscribe takes
     * the ack's position; a recovery that succeeded keeps the client's own position, which the
     * replayed messages that follow move forward (so that none of them looks like a duplicate);
     * a recovery that failed takes the ack's position and reports `resync`.
     */
    private subscribeAnswered;
    /** @internal Handles one frame from the server (exposed for tests). */
    handleFrame(raw: unknown): void;
    private answered;
    /**
     * A delivery. In a channel with history, a message at or before the subscription's
     * position in the same epoch was already seen and is dropped, so that the application
     * sees each message once; any other message with a position moves the position.
     */
    private delivery;
    private authenticated;
    /** Any frame proves the connection alive; after `pingInterval` of silence, ask with `ping`. */
    private armSilenceTimer;
    private scheduleRefresh;
    private refresh;
    private clearConnectionTimers;
    private clearTimer;
}
