// src/backoff.ts
function backoffCeiling(attempt, options) {
  const { minDelay, maxDelay } = options;
  const exponent = Math.min(Math.max(attempt, 0) + 1, 31);
  return Math.max(minDelay, Math.min(maxDelay, minDelay * 2 ** exponent));
}
function backoffDelay(attempt, options, random = Math.random) {
  const ceiling = backoffCeiling(attempt, options);
  return options.minDelay + random() * (ceiling - options.minDelay);
}

// src/emitter.ts
var Emitter = class {
  constructor() {
    this.listeners = {};
  }
  /** Calls `listener` on every `event` until the returned function is called. */
  on(event, listener) {
    let set = this.listeners[event];
    if (!set) {
      set = /* @__PURE__ */ new Set();
      this.listeners[event] = set;
    }
    set.add(listener);
    return () => this.off(event, listener);
  }
  /** Calls `listener` on the next `event` only. */
  once(event, listener) {
    const remove = this.on(event, (value) => {
      remove();
      listener(value);
    });
    return remove;
  }
  off(event, listener) {
    this.listeners[event]?.delete(listener);
  }
  /**
   * Calls the listeners in the order they were added. A listener that throws
   * does not stop the others nor corrupt the client's state: its error is
   * rethrown on a later tick, where it reaches the platform's error reporting.
   */
  emit(event, value) {
    const set = this.listeners[event];
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (error) {
        setTimeout(() => {
          throw error;
        }, 0);
      }
    }
  }
};

// src/types.ts
var HeraldError = class extends Error {
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
};

// src/client.ts
var TOKEN_CLOSE_CODES = /* @__PURE__ */ new Set([4001, 4003]);
var FINAL_CLOSE_CODES = /* @__PURE__ */ new Set([4009]);
var CLOSE_SILENT = 4e3;
var defaultClock = {
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) => clearTimeout(handle),
  now: () => Date.now()
};
var Subscription = class extends Emitter {
  /** @internal Use `client.subscribe(channel)`. */
  constructor(client, channel, position) {
    super();
    /** Whether the server has acknowledged the subscription on the current connection. */
    this.subscribed = false;
    this.client = client;
    this.channel = channel;
    this.position = position;
  }
  /** Stops the subscription: the server is told when connected, and no event follows. */
  unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }
  /** @internal */
  dispatch(event, value) {
    this.emit(event, value);
  }
};
var Client = class extends Emitter {
  constructor(url, options = {}) {
    super();
    /** The current state; `connected` once the server has accepted the token. */
    this.state = "disconnected";
    this.subscriptions = /* @__PURE__ */ new Map();
    this.pending = /* @__PURE__ */ new Map();
    /** Commands waiting for a connection, oldest first. */
    this.queue = [];
    this.nextMessageId = 1;
    /** Whether the application wants a connection (between `connect()` and `disconnect()`). */
    this.wanted = false;
    /** Failed attempts since the last successful connection. */
    this.attempt = 0;
    /** A token refused by the server: ask `getToken` for another before the next attempt. */
    this.tokenRefused = false;
    this.onOnline = () => {
      if (this.wanted && this.state === "disconnected") {
        this.attempt = 0;
        this.clearTimer("reconnectTimer");
        this.open();
      }
    };
    this.url = url;
    this.token = options.token;
    this.getToken = options.getToken;
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.options = {
      minReconnectDelay: options.minReconnectDelay ?? 500,
      maxReconnectDelay: options.maxReconnectDelay ?? 2e4,
      timeout: options.timeout ?? 1e4,
      pingInterval: options.pingInterval ?? 2e4,
      pongTimeout: options.pongTimeout ?? 1e4,
      maxQueuedCommands: options.maxQueuedCommands ?? 100,
      refreshMargin: options.refreshMargin ?? 6e4,
      clock: options.clock ?? defaultClock,
      random: options.random ?? Math.random
    };
    if (options.autoConnect !== false) this.connect();
  }
  /** Starts connecting (and keeps reconnecting) until `disconnect()`. */
  connect() {
    if (this.wanted) return;
    if (!this.WebSocketImpl) {
      throw new Error("no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package in Node)");
    }
    this.wanted = true;
    this.attempt = 0;
    const target = globalThis;
    target.addEventListener?.("online", this.onOnline);
    this.open();
  }
  /** Closes the connection and stops reconnecting; waiting commands are rejected. */
  disconnect() {
    if (!this.wanted) return;
    this.wanted = false;
    const target = globalThis;
    target.removeEventListener?.("online", this.onOnline);
    this.clearTimer("reconnectTimer");
    const wasDown = this.state === "disconnected";
    this.dropSocket(1e3, "client disconnect");
    for (const command of this.queue) this.fail(command, "disconnected", "the client was disconnected");
    this.queue = [];
    if (!wasDown) this.emit("disconnected", { code: 1e3, reason: "client disconnect", reconnect: false });
  }
  /**
   * Subscribes to `channel` now or on the next connection, and again after every reconnect,
   * recovering from the last position in channels that keep history. `position` starts
   * from a position the application stored (e.g. across page loads).
   */
  subscribe(channel, options = {}) {
    let sub = this.subscriptions.get(channel);
    if (sub) return sub;
    sub = new Subscription(this, channel, options.position);
    this.subscriptions.set(channel, sub);
    if (this.state === "connected") this.sendSubscribe(sub);
    return sub;
  }
  /** The subscription to `channel`, if any. */
  getSubscription(channel) {
    return this.subscriptions.get(channel);
  }
  unsubscribe(channel) {
    const sub = this.subscriptions.get(channel);
    if (!sub) return Promise.resolve();
    this.subscriptions.delete(channel);
    const wasSubscribed = sub.subscribed;
    sub.subscribed = false;
    if (this.state !== "connected" || !wasSubscribed) return Promise.resolve();
    return this.command("unsubscribe", { channel }).then(
      () => void 0,
      (error) => {
        if (error.code !== "not_subscribed" && error.code !== "disconnected") throw error;
      }
    );
  }
  /** Publishes `data` (any JSON value) to `channel`; resolves with the server's message id. */
  async publish(channel, data, options = {}) {
    const answer = await this.command("publish", { channel, data, ...options.type ? { type: options.type } : {} });
    return { messageId: answer.message_id, offset: answer.offset, epoch: answer.epoch };
  }
  /** A page of the channel's kept messages (latest `limit`, or those after `offset`). */
  async history(channel, options = {}) {
    const answer = await this.command("history", { channel, ...options });
    return {
      channel: answer.channel,
      epoch: answer.epoch,
      offset: answer.offset,
      recovered: answer.recovered,
      publications: (answer.publications ?? []).map(toMessage)
    };
  }
  /** Who is subscribed to the channel, over every node. */
  async presence(channel) {
    const answer = await this.command("presence", { channel });
    return {
      channel: answer.channel,
      connections: answer.connections,
      users: (answer.users ?? []).map((user) => ({
        userId: user.user_id,
        connections: user.connections
      }))
    };
  }
  /** Stores the read cursor for `channel` at `messageId`; the user's other connections get `read`. */
  async markRead(channel, messageId, options = {}) {
    const answer = await this.command("mark_read", { channel, message_id: messageId, ...options });
    return { channel: answer.channel, messageId: answer.message_id, offset: answer.offset };
  }
  /**
   * Sends any command and resolves with its `ack`'s `data` (or the `pong`'s); rejects with a
   * `HeraldError` on `error`, on timeout, or when the connection ends before the answer.
   * While disconnected, commands wait in a bounded queue (`maxQueuedCommands`) and their
   * timeout runs from the call.
   */
  command(type, data) {
    return new Promise((resolve, reject) => this.request(type, data, resolve, reject));
  }
  /**
   * `command` with callbacks, which run as the answer is read: the subscription bookkeeping
   * must see a subscribe's ack before the deliveries that follow it in the same stream.
   */
  request(type, data, resolve, reject) {
    const messageId = this.nextMessageId++;
    const command = {
      frame: data === void 0 ? { type, message_id: messageId } : { type, message_id: messageId, data },
      resolve,
      reject,
      timer: void 0,
      sent: false
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
  async open() {
    if (!this.wanted || this.socket) return;
    const WebSocketImpl = this.WebSocketImpl;
    this.state = "connecting";
    this.emit("connecting", { attempt: this.attempt });
    let token;
    try {
      token = await this.currentToken();
    } catch (error) {
      this.afterClose(1006, `getToken failed: ${error?.message ?? error}`, true);
      return;
    }
    if (!this.wanted || this.state !== "connecting" || this.socket) return;
    if (token === void 0) {
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
      this.socket = void 0;
      this.closed(event.code, event.reason ?? "");
    };
    socket.onerror = () => {
    };
  }
  async currentToken() {
    if (this.getToken && (this.token === void 0 || this.tokenRefused)) {
      this.token = await this.getToken();
      this.tokenRefused = false;
    }
    return this.token;
  }
  /** Forgets the socket (its late events are ignored) and closes it. */
  dropSocket(code, reason) {
    this.clearConnectionTimers();
    const socket = this.socket;
    this.socket = void 0;
    this.rejectInFlight();
    for (const sub of this.subscriptions.values()) sub.subscribed = false;
    this.info = void 0;
    this.state = "disconnected";
    if (socket) {
      try {
        socket.close(code, reason);
      } catch {
      }
    }
  }
  /** The socket closed (or went silent): decide whether and when to reconnect. */
  closed(code, reason) {
    this.dropSocket(CLOSE_SILENT, reason);
    let reconnect = this.wanted;
    if (FINAL_CLOSE_CODES.has(code)) reconnect = false;
    if (TOKEN_CLOSE_CODES.has(code)) {
      if (this.getToken) this.tokenRefused = true;
      else reconnect = false;
    }
    this.afterClose(code, reason, reconnect);
  }
  afterClose(code, reason, reconnect) {
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
      this.options.random
    );
    this.attempt++;
    this.reconnectTimer = this.options.clock.setTimeout(() => {
      this.reconnectTimer = void 0;
      this.open();
    }, delay);
  }
  rejectInFlight() {
    for (const command of [...this.pending.values()]) {
      if (command.sent) this.fail(command, "disconnected", `the connection closed before the answer to \`${command.frame.type}\``);
    }
  }
  fail(command, code, message) {
    this.options.clock.clearTimeout(command.timer);
    if (command.frame.message_id !== void 0) this.pending.delete(command.frame.message_id);
    command.reject(new HeraldError(code, message));
  }
  sendCommand(command) {
    command.sent = true;
    this.socket?.send(JSON.stringify(command.frame));
  }
  sendSubscribe(sub) {
    const from = sub.position;
    const data = { channel: sub.channel };
    if (from) {
      data.offset = from.offset;
      data.epoch = from.epoch;
    }
    this.request(
      "subscribe",
      data,
      (answer) => this.subscribeAnswered(sub, from, answer),
      (error) => {
        if (this.subscriptions.get(sub.channel) !== sub) return;
        if (error.code === "disconnected") return;
        sub.dispatch("error", error);
        if ((error.code === "unavailable" || error.code === "timeout") && this.state === "connected") {
          this.options.clock.setTimeout(() => {
            if (this.state === "connected" && this.subscriptions.get(sub.channel) === sub && !sub.subscribed) this.sendSubscribe(sub);
          }, backoffDelay(0, { minDelay: this.options.minReconnectDelay, maxDelay: this.options.maxReconnectDelay }, this.options.random));
        }
      }
    );
  }
  /**
   * Position bookkeeping for a subscribe's ack (docs/protocol.md §6): a fresh subscribe takes
   * the ack's position; a recovery that succeeded keeps the client's own position, which the
   * replayed messages that follow move forward (so that none of them looks like a duplicate);
   * a recovery that failed takes the ack's position and reports `resync`.
   */
  subscribeAnswered(sub, from, answer) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    sub.subscribed = true;
    const ackPosition = answer.epoch !== void 0 && answer.offset !== void 0 ? { epoch: answer.epoch, offset: answer.offset } : void 0;
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
  handleFrame(raw) {
    let frame;
    let payload;
    if (typeof raw === "string") {
      try {
        frame = JSON.parse(raw);
      } catch {
        return;
      }
    } else {
      const bytes = toBytes(raw);
      if (!bytes) return;
      const newline = bytes.indexOf(10);
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
        if (frame.message_id === void 0) this.emit("error", error);
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
        this.emit("error", new HeraldError("auth_failed", String(data.message ?? "")));
        break;
      case "disconnect":
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
  answered(messageId, settle) {
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
  delivery(message) {
    const sub = this.subscriptions.get(message.channel);
    if (sub && message.offset !== void 0 && message.epoch !== void 0) {
      const position = sub.position;
      if (position && position.epoch === message.epoch && message.offset <= position.offset) return;
      sub.position = { epoch: message.epoch, offset: message.offset };
    }
    this.emit("message", message);
    sub?.dispatch("message", message);
  }
  authenticated(data) {
    if (this.state !== "connecting") return;
    this.state = "connected";
    this.attempt = 0;
    this.info = {
      userId: String(data.user_id),
      connectionId: data.connection_id,
      expiresAt: data.expires_at,
      channel: data.channel,
      nodeId: data.node_id
    };
    this.scheduleRefresh(data.expires_at);
    this.emit("connected", this.info);
    if (this.state !== "connected") return;
    for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
    const queued = this.queue;
    this.queue = [];
    for (const command of queued) if (this.pending.has(command.frame.message_id)) this.sendCommand(command);
  }
  // ---- timers: liveness and token refresh ----
  /** Any frame proves the connection alive; after `pingInterval` of silence, ask with `ping`. */
  armSilenceTimer() {
    this.clearTimer("silenceTimer");
    this.clearTimer("pongTimer");
    this.silenceTimer = this.options.clock.setTimeout(() => {
      this.silenceTimer = void 0;
      const socket = this.socket;
      if (!socket) return;
      socket.send(JSON.stringify({ type: "ping" }));
      this.pongTimer = this.options.clock.setTimeout(() => {
        this.pongTimer = void 0;
        if (this.socket !== socket) return;
        this.closed(1006, "no answer to ping");
      }, this.options.pongTimeout);
    }, this.options.pingInterval);
  }
  scheduleRefresh(expiresAt) {
    this.clearTimer("refreshTimer");
    if (!this.getToken || typeof expiresAt !== "number") return;
    const lifetime = expiresAt * 1e3 - this.options.clock.now();
    const delay = Math.max(0, lifetime - Math.min(this.options.refreshMargin, lifetime / 4));
    this.refreshTimer = this.options.clock.setTimeout(() => {
      this.refreshTimer = void 0;
      this.refresh();
    }, delay);
  }
  async refresh() {
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
      if (this.state === "connected")
        this.refreshTimer = this.options.clock.setTimeout(() => this.refresh(), this.options.minReconnectDelay * 4);
    }
  }
  clearConnectionTimers() {
    this.clearTimer("silenceTimer");
    this.clearTimer("pongTimer");
    this.clearTimer("refreshTimer");
  }
  clearTimer(name) {
    if (this[name] !== void 0) this.options.clock.clearTimeout(this[name]);
    this[name] = void 0;
  }
};
function toMessage(frame) {
  const message = {
    channel: frame.channel,
    type: frame.type ?? "message",
    data: frame.data,
    binary: frame.binary === true,
    messageId: String(frame.message_id)
  };
  if (typeof frame.offset === "number") message.offset = frame.offset;
  if (typeof frame.epoch === "string") message.epoch = frame.epoch;
  if (typeof frame.timestamp === "number") message.timestamp = frame.timestamp;
  if (typeof frame.from === "string") message.from = frame.from;
  if (frame.data_base64 !== void 0 && frame.data === void 0) {
    message.data = base64ToBytes(frame.data_base64);
    message.binary = true;
  }
  return message;
}
function toBytes(raw) {
  if (raw instanceof Uint8Array) return raw;
  if (raw instanceof ArrayBuffer) return new Uint8Array(raw);
  if (ArrayBuffer.isView(raw)) return new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
  return void 0;
}
function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
export {
  Client,
  HeraldError,
  Subscription,
  backoffCeiling,
  backoffDelay
};
