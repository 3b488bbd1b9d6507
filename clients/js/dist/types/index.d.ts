/** The public surface: `import { Client } from "herald-client"` or the global `Herald` of herald.js. */
export { Client, Subscription } from "./client.js";
export type { ClientEvents, ClientOptions, ClientState, Clock, SubscriptionEvents, WebSocketConstructor, WebSocketLike, } from "./client.js";
export { backoffCeiling, backoffDelay } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { HeraldError } from "./types.js";
export type { ConnectedInfo, DisconnectedInfo, HistoryResult, MarkReadResult, Message, Position, PresenceResult, PublishResult, RecoveredInfo, ResyncInfo, } from "./types.js";
