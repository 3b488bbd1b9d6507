/** The shapes the client hands to applications, in the application's naming (camelCase). */
/** A delivery: a message published to a channel. */
export interface Message {
    channel: string;
    /** `message` unless the publisher chose another type (`notification`, `new_message`, `join`…). */
    type: string;
    /** The published JSON value; for a binary delivery, its bytes. */
    data: unknown;
    /** True when `data` is the `Uint8Array` payload of a binary delivery. */
    binary: boolean;
    /** The server's id of the message: the id `markRead` takes. */
    messageId: string;
    /** The message's position, in channels that keep history. */
    offset?: number;
    epoch?: string;
    /** Milliseconds since the Unix epoch, when the hub accepted the message. */
    timestamp?: number;
    /** The sending user, for messages sent by a user. */
    from?: string;
}
/** A channel position: the last message seen, in one unbroken history of the channel. */
export interface Position {
    epoch: string;
    offset: number;
}
export interface ConnectedInfo {
    userId: string;
    connectionId: number;
    /** The token's `exp`, in Unix seconds. */
    expiresAt?: number;
    /** The personal channel `user:{userId}`, to which every connection is subscribed. */
    channel: string;
    nodeId?: string;
}
export interface DisconnectedInfo {
    /** The WebSocket close code (1006 when the socket failed or went silent). */
    code: number;
    reason: string;
    /** Whether the client will connect again by itself. */
    reconnect: boolean;
}
/** A subscribe that recovered: the missed messages follow as `message` events. */
export interface RecoveredInfo {
    channel: string;
    /** The position the client recovered from. */
    from: Position;
    /** The position after the last missed message. */
    to: Position;
}
/**
 * Messages of the channel were lost and cannot be replayed: refetch from your
 * backend, then carry on; live messages continue after `to`.
 */
export interface ResyncInfo {
    channel: string;
    /** The position the client held, when it held one. */
    from?: Position;
    /** The position the stream continues from. */
    to: Position;
    /** `subscribe`: a reconnect could not recover; `gap`: the server reported a gap while connected. */
    cause: "subscribe" | "gap";
}
export interface PublishResult {
    messageId: string;
    offset?: number;
    epoch?: string;
}
export interface HistoryResult {
    channel: string;
    /** The channel's current position (not the page's). */
    epoch: string;
    offset: number;
    recovered: boolean;
    publications: Message[];
}
export interface PresenceResult {
    channel: string;
    connections: number;
    users: {
        userId: string;
        connections: number;
    }[];
}
export interface MarkReadResult {
    channel: string;
    messageId: string;
    offset?: number;
}
/** Why a command was rejected. `code` is the server's error code or one of the client's own. */
export declare class HeraldError extends Error {
    /**
     * A server error code (`forbidden`, `invalid_channel`, …; see docs/protocol.md §7), or
     * `timeout` (no answer in time), `disconnected` (the connection ended before the answer,
     * or `disconnect()` was called), `queue_full` (too many commands waiting for a connection).
     */
    readonly code: string;
    constructor(code: string, message: string);
}
