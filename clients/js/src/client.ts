/**
 * The Herald client: one WebSocket connection that authenticates, reconnects
 * with back-off, keeps subscriptions and their positions across reconnects,
 * refreshes its token, and answers each command with its own promise.
 * The wire protocol is docs/protocol.md in the Herald repository.
 */
import { backoffDelay } from "./backoff.js";
import { Emitter } from "./emitter.js";
import {
  ConnectedInfo,
  DisconnectedInfo,
  HeraldError,
  HistoryResult,
  MarkReadResult,
  Message,
  Position,
  PresenceResult,
  PublishResult,
  RecoveredInfo,
  ResyncInfo,
} from "./types.js";

/** The part of the WebSocket interface the client uses (browsers' and the `ws` package's). */
export interface WebSocketLike {
  readyState: number;
  binaryType: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
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
  connecting: { attempt: number };
  connected: ConnectedInfo;
  disconnected: DisconnectedInfo;
  message: Message;
  /** An error that belongs to no command: `auth_failed`, a failed token refresh, an unsolicited `error`. */
  error: HeraldError;
  /** The server API subscribed or unsubscribed this connection. */
  subscribed: { channel: string };
  unsubscribed: { channel: string; reason?: string };
}

export interface SubscriptionEvents {
  [name: string]: unknown;
  message: Message;
  subscribed: { channel: string; position?: Position };
  recovered: RecoveredInfo;
  resync: ResyncInfo;
  error: HeraldError;
}

/**
 * Close codes after which the same token must not be used again (docs/protocol.md §8):
 * the client asks `getToken` for a new one, or stops when it has none.
 */
const TOKEN_CLOSE_CODES = new Set([4001, 4003]);
/** Close codes after which reconnecting cannot help: too many connections for this user. */
const FINAL_CLOSE_CODES = new Set([4009]);
/** Closes the client itself chooses: a connection that went silent. */
const CLOSE_SILENT = 4000;

const defaultClock: Clock = {
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
  now: () => Date.now(),
};

interface Pending {
  frame: { type: string; message_id?: number; data?: unknown };
  resolve: (data: any) => void;
  reject: (error: HeraldError) => void;
  timer: unknown;
  sent: boolean;
}

/** A channel the client keeps subscribed, across reconnects, until `unsubscribe()`. */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  /** The last position seen, in channels that keep history; used to recover. */
  position: Position | undefined;
  /** Whether the server has acknowledged the subscription on the current connection. */
  subscribed = false;
  private readonly client: Client;

  /** @internal Use `client.subscribe(channel)`. */
  constructor(client: Client, channel: string, position?: Position) {
    super();
    this.client = client;
    this.channel = channel;
    this.position = position;
  }

  /** Stops the subscription: the server is told when connected, and no event follows. */
  unsubscribe(): Promise<void> {
    return this.client.unsubscribe(this.channel);
  }

  /** @internal */
  dispatch<K extends keyof SubscriptionEvents>(event: K, value: SubscriptionEvents[K]): void {
    this.emit(event, value);
  }
}

export class Client extends Emitter<ClientEvents> {
  readonly url: string;
  /** The current state; `connected` once the server has accepted the token. */
  state: ClientState = "disconnected";
  /** Set while connected. */
  info: ConnectedInfo | undefined;

  private readonly options: Required<
    Omit<ClientOptions, "token" | "getToken" | "WebSocket" | "autoConnect">
  >;
  private readonly WebSocketImpl: WebSocketConstructor | undefined;
  private readonly getToken: (() => Promise<string> | string) | undefined;
  private token: string | undefined;
  private readonly subscriptions = new Map<string, Subscription>();
  private readonly pending = new Map<number, Pending>();
  /** Commands waiting for a connection, oldest first. */
  private queue: Pending[] = [];
  private nextMessageId = 1;
  private socket: WebSocketLike | undefined;
  /** Whether the application wants a connection (between `connect()` and `disconnect()`). */
  private wanted = false;
  /** Failed attempts since the last successful connection. */
  private attempt = 0;
  /** A token refused by the server: ask `getToken` for another before the next attempt. */
  private tokenRefused = false;
  private reconnectTimer: unknown;
  private silenceTimer: unknown;
  private pongTimer: unknown;
  private refreshTimer: unknown;
  private readonly onOnline = () => {
    if (this.wanted && this.state === "disconnected") {
      this.attempt = 0;
      this.clearTimer("reconnectTimer");
      this.open();
    }
  };

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = url;
    this.token = options.token;
    this.getToken = options.getToken;
    this.WebSocketImpl =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.options = {
      minReconnectDelay: options.minReconnectDelay ?? 500,
      maxReconnectDelay: options.maxReconnectDelay ?? 20000,
      timeout: options.timeout ?? 10000,
      pingInterval: options.pingInterval ?? 20000,
      pongTimeout: options.pongTimeout ?? 10000,
      maxQueuedCommands: options.maxQueuedCommands ?? 100,
      refreshMargin: options.refreshMargin ?? 60000,
      clock: options.clock ?? defaultClock,
      random: options.random ?? Math.random,
    };
    if (options.autoConnect !== false) this.connect();
  }

  /** Starts connecting (and keeps reconnecting) until `disconnect()`. */
  connect(): void {
    if (this.wanted) return;
    if (!this.WebSocketImpl) {
      throw new Error("no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package in Node)");
    }
    this.wanted = true;
    this.attempt = 0;
    const target = globalThis as { addEventListener?: (name: string, fn: () => void) => void };
    target.addEventListener?.("online", this.onOnline);
    this.open();
  }

  /** Closes the connection and stops reconnecting; waiting commands are rejected. */
  disconnect(): void {
    if (!this.wanted) return;
    this.wanted = false;
    const target = globalThis as { removeEventListener?: (name: string, fn: () => void) => void };
    target.removeEventListener?.("online", this.onOnline);
    this.clearTimer("reconnectTimer");
    const wasDown = this.state === "disconnected";
    this.dropSocket(1000, "client disconnect");
    for (const command of this.queue) this.fail(command, "disconnected", "the client was disconnected");
    this.queue = [];
    if (!wasDown) this.emit("disconnected", { code: 1000, reason: "client disconnect", reconnect: false });
  }

  /**
   * Subscribes to `channel` now or on the next connection, and again after every reconnect,
   * recovering from the last position in channels that keep history. `position` starts
   * from a position the application stored (e.g. across page loads).
   */
  subscribe(channel: string, options: { position?: Position } = {}): Subscription {
    let sub = this.subscriptions.get(channel);
    if (sub) return sub;
    sub = new Subscription(this, channel, options.position);
    this.subscriptions.set(channel, sub);
    if (this.state === "connected") this.sendSubscribe(sub);
    return sub;
  }

  /** The subscription to `channel`, if any. */
  getSubscription(channel: string): Subscription | undefined {
    return this.subscriptions.get(channel);
  }

  unsubscribe(channel: string): Promise<void> {
    const sub = this.subscriptions.get(channel);
    if (!sub) return Promise.resolve();
    this.subscriptions.delete(channel);
    const wasSubscribed = sub.subscribed;
    sub.subscribed = false;
    if (this.state !== "connected" || !wasSubscribed) return Promise.resolve();
    return this.command("unsubscribe", { channel }).then(
      () => undefined,
      (error: HeraldError) => {
        if (error.code !== "not_subscribed" && error.code !== "disconnected") throw error;
      },
    );
  }

  /** Publishes `data` (any JSON value) to `channel`; resolves with the server's message id. */
  async publish(channel: string, data: unknown, options: { type?: string } = {}): Promise<PublishResult> {
    const answer = await this.command("publish", { channel, data, ...(options.type ? { type: options.type } : {}) });
    return { messageId: answer.message_id, offset: answer.offset, epoch: answer.epoch };
  }

  /** A page of the channel's kept messages (latest `limit`, or those after `offset`). */
  async history(
    channel: string,
    options: { limit?: number; offset?: number; epoch?: string } = {},
  ): Promise<HistoryResult> {
    const answer = await this.command("history", { channel, ...options });
    return {
      channel: answer.channel,
      epoch: answer.epoch,
      offset: answer.offset,
      recovered: answer.recovered,
      publications: (answer.publications ?? []).map(toMessage),
    };
  }

  /** Who is subscribed to the channel, over every node. */
  async presence(channel: string): Promise<PresenceResult> {
    const answer = await this.command("presence", { channel });
    return {
      channel: answer.channel,
      connections: answer.connections,
      users: (answer.users ?? []).map((user: { user_id: string; connections: number }) => ({
        userId: user.user_id,
        connections: user.connections,
      })),
    };
  }

  /** Stores the read cursor for `channel` at `messageId`; the user's other connections get `read`. */
  async markRead(channel: string, messageId: string, options: { offset?: number } = {}): Promise<MarkReadResult> {
    const answer = await this.command("mark_read", { channel, message_id: messageId, ...options });
    return { channel: answer.channel, messageId: answer.message_id, offset: answer.offset };
  }

  /**
   * Sends any command and resolves with its `ack`'s `data` (or the `pong`'s); rejects with a
   * `HeraldError` on `error`, on timeout, or when the connection ends before the answer.
   * While disconnected, commands wait in a bounded queue (`maxQueuedCommands`) and their
   * timeout runs from the call.
   */
  command(type: string, data?: unknown): Promise<any> {
    return new Promise((resolve, reject) => this.request(type, data, resolve, reject));
  }

  /**
   * `command` with callbacks, which run as the answer is read: the subscription bookkeeping
   * must see a subscribe's ack before the deliveries that follow it in the same stream.
   */
  private request(type: string, data: unknown, resolve: (data: any) => void, reject: (error: HeraldError) => void): void {
    const messageId = this.nextMessageId++;
    const command: Pending = {
      frame: data === undefined ? { type, message_id: messageId } : { type, message_id: messageId, data },
      resolve,
      reject,
      timer: undefined,
      sent: false,
    };
    if (this.state !== "connected") {
      if (!this.wanted) {
        reject(new HeraldError("disconnected", `\`${type}\` while the client is disconnected; call connect() first`));
        return;
      }
      if (this.queue.length >= this.options.maxQueuedCommands) {
        reject(new HeraldError("queue_full", `\`${type}\`: ${this.queue.length} commands already wait for a connection`));
        return;
      }
    }
    command.timer = this.options.clock.setTimeout(() => {
      this.pending.delete(messageId);
      this.queue = this.queue.filter((queued) => queued !== command);
      reject(new HeraldError("timeout", `no answer to \`${type}\` within ${this.options.timeout} ms`));
    }, this.options.timeout);
    this.pending.set(messageId, command);
    if (this.state === "connected") this.sendCommand(command);
    else this.queue.push(command);
  }

  // ---- connection life cycle ----

  private async open(): Promise<void> {
    if (!this.wanted || this.socket) return;
    const WebSocketImpl = this.WebSocketImpl!;
    this.state = "connecting";
    this.emit("connecting", { attempt: this.attempt });
    let token: string | undefined;
    try {
      token = await this.currentToken();
    } catch (error) {
      this.afterClose(1006, `getToken failed: ${(error as Error)?.message ?? error}`, true);
      return;
    }
    if (!this.wanted || this.state !== "connecting" || this.socket) return;
    if (token === undefined) {
      this.afterClose(4001, "no token: pass options.token or options.getToken", false);
      return;
    }
    const socket = new WebSocketImpl(this.url);
    this.socket = socket;
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.armSilenceTimer();
      socket.send(JSON.stringify({ type: "auth", data: { token } }));
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.armSilenceTimer();
      this.handleFrame(event.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = undefined;
      this.closed(event.code, event.reason ?? "");
    };
    socket.onerror = () => {
      // A close event follows; its code (1006) says the rest.
    };
  }

  private async currentToken(): Promise<string | undefined> {
    if (this.getToken && (this.token === undefined || this.tokenRefused)) {
      this.token = await this.getToken();
      this.tokenRefused = false;
    }
    return this.token;
  }

  /** Forgets the socket (its late events are ignored) and closes it. */
  private dropSocket(code: number, reason: string): void {
    this.clearConnectionTimers();
    const socket = this.socket;
    this.socket = undefined;
    this.rejectInFlight();
    for (const sub of this.subscriptions.values()) sub.subscribed = false;
    this.info = undefined;
    this.state = "disconnected";
    if (socket) {
      try {
        socket.close(code, reason);
      } catch {
        // Closing a socket that never opened throws in some implementations.
      }
    }
  }

  /** The socket closed (or went silent): decide whether and when to reconnect. */
  private closed(code: number, reason: string): void {
    // A socket still held here is one the client gives up on; 4000 is the client's own close code.
    this.dropSocket(CLOSE_SILENT, reason);
    let reconnect = this.wanted;
    if (FINAL_CLOSE_CODES.has(code)) reconnect = false;
    if (TOKEN_CLOSE_CODES.has(code)) {
      if (this.getToken) this.tokenRefused = true;
      else reconnect = false;
    }
    this.afterClose(code, reason, reconnect);
  }

  private afterClose(code: number, reason: string, reconnect: boolean): void {
    this.state = "disconnected";
    reconnect = reconnect && this.wanted;
    this.emit("disconnected", { code, reason, reconnect });
    if (!reconnect) {
      if (this.wanted) {
        this.wanted = false;
        for (const command of this.queue) this.fail(command, "disconnected", `the connection closed (${code}) and will not be retried`);
        this.queue = [];
      }
      return;
    }
    const delay = backoffDelay(
      this.attempt,
      { minDelay: this.options.minReconnectDelay, maxDelay: this.options.maxReconnectDelay },
      this.options.random,
    );
    this.attempt++;
    this.reconnectTimer = this.options.clock.setTimeout(() => {
      this.reconnectTimer = undefined;
      this.open();
    }, delay);
  }

  private rejectInFlight(): void {
    for (const command of [...this.pending.values()]) {
      if (command.sent) this.fail(command, "disconnected", `the connection closed before the answer to \`${command.frame.type}\``);
    }
  }

  private fail(command: Pending, code: string, message: string): void {
    this.options.clock.clearTimeout(command.timer);
    if (command.frame.message_id !== undefined) this.pending.delete(command.frame.message_id);
    command.reject(new HeraldError(code, message));
  }

  private sendCommand(command: Pending): void {
    command.sent = true;
    this.socket?.send(JSON.stringify(command.frame));
  }

  private sendSubscribe(sub: Subscription): void {
    const from = sub.position;
    const data: { channel: string; offset?: number; epoch?: string } = { channel: sub.channel };
    if (from) {
      data.offset = from.offset;
      data.epoch = from.epoch;
    }
    this.request(
      "subscribe",
      data,
      (answer) => this.subscribeAnswered(sub, from, answer),
      (error: HeraldError) => {
        if (this.subscriptions.get(sub.channel) !== sub) return;
        if (error.code === "disconnected") return; // resubscribed on the next connection
        sub.dispatch("error", error);
        // Transient failures are retried on this connection; the rest wait for a reconnect.
        if ((error.code === "unavailable" || error.code === "timeout") && this.state === "connected") {
          this.options.clock.setTimeout(() => {
            if (this.state === "connected" && this.subscriptions.get(sub.channel) === sub && !sub.subscribed) this.sendSubscribe(sub);
          }, backoffDelay(0, { minDelay: this.options.minReconnectDelay, maxDelay: this.options.maxReconnectDelay }, this.options.random));
        }
      },
    );
  }

  /**
   * Position bookkeeping for a subscribe's ack (docs/protocol.md §6): a fresh subscribe takes
   * the ack's position; a recovery that succeeded keeps the client's own position, which the
   * replayed messages that follow move forward (so that none of them looks like a duplicate);
   * a recovery that failed takes the ack's position and reports `resync`.
   */
  private subscribeAnswered(
    sub: Subscription,
    from: Position | undefined,
    answer: { channel: string; epoch?: string; offset?: number; recovered?: boolean },
  ): void {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    sub.subscribed = true;
    const ackPosition =
      answer.epoch !== undefined && answer.offset !== undefined ? { epoch: answer.epoch, offset: answer.offset } : undefined;
    if (from && answer.recovered === true && ackPosition) {
      sub.dispatch("subscribed", { channel: sub.channel, position: from });
      sub.dispatch("recovered", { channel: sub.channel, from, to: ackPosition });
      return;
    }
    sub.position = ackPosition;
    sub.dispatch("subscribed", { channel: sub.channel, position: ackPosition });
    if (from && ackPosition) sub.dispatch("resync", { channel: sub.channel, from, to: ackPosition, cause: "subscribe" });
  }

  // ---- frames ----

  /** @internal Handles one frame from the server (exposed for tests). */
  handleFrame(raw: unknown): void {
    let frame: any;
    let payload: Uint8Array | undefined;
    if (typeof raw === "string") {
      try {
        frame = JSON.parse(raw);
      } catch {
        return; // The server only sends JSON; ignore anything else rather than fail.
      }
    } else {
      const bytes = toBytes(raw);
      if (!bytes) return;
      const newline = bytes.indexOf(0x0a);
      if (newline < 0) return;
      try {
        frame = JSON.parse(new TextDecoder().decode(bytes.subarray(0, newline)));
      } catch {
        return;
      }
      payload = bytes.slice(newline + 1);
    }
    if (typeof frame !== "object" || frame === null) return;
    if (typeof frame.channel === "string") {
      this.delivery(toMessage(payload ? { ...frame, data: payload, binary: true } : frame));
      return;
    }
    const data = frame.data ?? {};
    switch (frame.type) {
      case "ack":
      case "pong":
        this.answered(frame.message_id, (command) => {
          this.options.clock.clearTimeout(command.timer);
          command.resolve(data);
        });
        break;
      case "error": {
        const error = new HeraldError(String(data.code ?? "error"), String(data.message ?? ""));
        if (frame.message_id === undefined) this.emit("error", error);
        else
          this.answered(frame.message_id, (command) => {
            this.options.clock.clearTimeout(command.timer);
            command.reject(error);
          });
        break;
      }
      case "auth_success":
        this.authenticated(data);
        break;
      case "auth_failed":
        // The close (4001 or 4002) follows and decides what happens next.
        this.emit("error", new HeraldError("auth_failed", String(data.message ?? "")));
        break;
      case "disconnect":
        // The server drains; its close (1001) follows, and the back-off spreads the reconnects.
        break;
      case "subscribed":
        this.emit("subscribed", { channel: data.channel });
        break;
      case "unsubscribed": {
        this.emit("unsubscribed", { channel: data.channel, reason: data.reason });
        break;
      }
      case "resync": {
        const sub = this.subscriptions.get(data.channel);
        if (!sub) break;
        const to = { epoch: data.epoch, offset: data.offset };
        const from = sub.position;
        sub.position = to;
        sub.dispatch("resync", { channel: sub.channel, from, to, cause: "gap" });
        break;
      }
    }
  }

  private answered(messageId: unknown, settle: (command: Pending) => void): void {
    if (typeof messageId !== "number") return;
    const command = this.pending.get(messageId);
    if (!command) return;
    this.pending.delete(messageId);
    settle(command);
  }

  /**
   * A delivery. In a channel with history, a message at or before the subscription's
   * position in the same epoch was already seen and is dropped, so that the application
   * sees each message once; any other message with a position moves the position.
   */
  private delivery(message: Message): void {
    const sub = this.subscriptions.get(message.channel);
    if (sub && message.offset !== undefined && message.epoch !== undefined) {
      const position = sub.position;
      if (position && position.epoch === message.epoch && message.offset <= position.offset) return;
      sub.position = { epoch: message.epoch, offset: message.offset };
    }
    this.emit("message", message);
    sub?.dispatch("message", message);
  }

  private authenticated(data: any): void {
    if (this.state !== "connecting") return;
    this.state = "connected";
    this.attempt = 0;
    this.info = {
      userId: String(data.user_id),
      connectionId: data.connection_id,
      expiresAt: data.expires_at,
      channel: data.channel,
      nodeId: data.node_id,
    };
    this.scheduleRefresh(data.expires_at);
    this.emit("connected", this.info);
    if (this.state !== "connected") return; // a listener disconnected
    for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
    const queued = this.queue;
    this.queue = [];
    for (const command of queued) if (this.pending.has(command.frame.message_id!)) this.sendCommand(command);
  }

  // ---- timers: liveness and token refresh ----

  /** Any frame proves the connection alive; after `pingInterval` of silence, ask with `ping`. */
  private armSilenceTimer(): void {
    this.clearTimer("silenceTimer");
    this.clearTimer("pongTimer");
    this.silenceTimer = this.options.clock.setTimeout(() => {
      this.silenceTimer = undefined;
      const socket = this.socket;
      if (!socket) return;
      socket.send(JSON.stringify({ type: "ping" }));
      this.pongTimer = this.options.clock.setTimeout(() => {
        this.pongTimer = undefined;
        if (this.socket !== socket) return;
        // Browsers may take minutes to notice a dead TCP connection: give up on it now.
        this.closed(1006, "no answer to ping");
      }, this.options.pongTimeout);
    }, this.options.pingInterval);
  }

  private scheduleRefresh(expiresAt: unknown): void {
    this.clearTimer("refreshTimer");
    if (!this.getToken || typeof expiresAt !== "number") return;
    const lifetime = expiresAt * 1000 - this.options.clock.now();
    const delay = Math.max(0, lifetime - Math.min(this.options.refreshMargin, lifetime / 4));
    this.refreshTimer = this.options.clock.setTimeout(() => {
      this.refreshTimer = undefined;
      this.refresh();
    }, delay);
  }

  private async refresh(): Promise<void> {
    if (this.state !== "connected" || !this.getToken) return;
    try {
      const token = await this.getToken();
      if (this.state !== "connected") return;
      this.token = token;
      const answer = await this.command("refresh", { token });
      this.scheduleRefresh(answer.expires_at);
      for (const channel of answer.unsubscribed ?? []) {
        const sub = this.subscriptions.get(channel);
        if (!sub) continue;
        this.subscriptions.delete(channel);
        sub.subscribed = false;
        sub.dispatch("error", new HeraldError("forbidden", `the new token no longer allows \`${channel}\``));
      }
    } catch (error) {
      if (error instanceof HeraldError && error.code === "disconnected") return;
      this.emit("error", error instanceof HeraldError ? error : new HeraldError("refresh_failed", String(error)));
      // Try again shortly; if the token expires meanwhile, the 4003 close brings a new one.
      if (this.state === "connected")
        this.refreshTimer = this.options.clock.setTimeout(() => this.refresh(), this.options.minReconnectDelay * 4);
    }
  }

  private clearConnectionTimers(): void {
    this.clearTimer("silenceTimer");
    this.clearTimer("pongTimer");
    this.clearTimer("refreshTimer");
  }

  private clearTimer(name: "reconnectTimer" | "silenceTimer" | "pongTimer" | "refreshTimer"): void {
    if (this[name] !== undefined) this.options.clock.clearTimeout(this[name]);
    this[name] = undefined;
  }
}

/** A delivery (or history publication) from the wire's shape to the application's. */
function toMessage(frame: any): Message {
  const message: Message = {
    channel: frame.channel,
    type: frame.type ?? "message",
    data: frame.data,
    binary: frame.binary === true,
    messageId: String(frame.message_id),
  };
  if (typeof frame.offset === "number") message.offset = frame.offset;
  if (typeof frame.epoch === "string") message.epoch = frame.epoch;
  if (typeof frame.timestamp === "number") message.timestamp = frame.timestamp;
  if (typeof frame.from === "string") message.from = frame.from;
  if (frame.data_base64 !== undefined && frame.data === undefined) {
    message.data = base64ToBytes(frame.data_base64);
    message.binary = true;
  }
  return message;
}

function toBytes(raw: unknown): Uint8Array | undefined {
  if (raw instanceof Uint8Array) return raw;
  if (raw instanceof ArrayBuffer) return new Uint8Array(raw);
  if (ArrayBuffer.isView(raw)) return new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
  return undefined;
}

function base64ToBytes(text: string): Uint8Array {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
