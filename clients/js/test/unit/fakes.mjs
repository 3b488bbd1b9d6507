// Test doubles: a clock whose time moves only when a test says so, and a WebSocket
// whose "server" side the test plays frame by frame.

export class FakeClock {
  constructor(now = 1_800_000_000_000) {
    this.time = now;
    this.timers = new Map();
    this.nextHandle = 1;
  }
  now() {
    return this.time;
  }
  setTimeout(callback, ms) {
    const handle = this.nextHandle++;
    this.timers.set(handle, { at: this.time + ms, ms, callback });
    return handle;
  }
  clearTimeout(handle) {
    this.timers.delete(handle);
  }
  /** The delays of the timers still pending, in the order they were set. */
  pendingDelays() {
    return [...this.timers.values()].map((timer) => timer.ms);
  }
  /** Moves time forward, running each timer that falls due, in order. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let next;
      for (const [handle, timer] of this.timers) {
        if (timer.at <= end && (!next || timer.at < next[1].at)) next = [handle, timer];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.time = next[1].at;
      next[1].callback();
      await settle();
    }
    this.time = end;
    await settle();
  }
}

/** Lets promise callbacks that are already due run (no time passes on the fake clock). */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

export function fakeWebSocket() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.binaryType = "blob";
      this.sent = [];
      this.closedWith = undefined;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // The server's side:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    receive(frame) {
      this.onmessage?.({ data: typeof frame === "string" || frame instanceof ArrayBuffer || frame instanceof Uint8Array ? frame : JSON.stringify(frame) });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** The commands sent of one type. */
    commands(type) {
      return this.sent.filter((frame) => frame.type === type);
    }
    last(type) {
      const all = this.commands(type);
      return all[all.length - 1];
    }
    /** Answers the last command of `type` with an ack carrying `data`. */
    ack(type, data = {}) {
      const command = this.last(type);
      if (!command) throw new Error(`no ${type} was sent`);
      this.receive({ type: "ack", message_id: command.message_id, data });
    }
  }
  return { WebSocket: FakeSocket, sockets };
}
