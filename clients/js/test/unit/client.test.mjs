import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, HeraldError } from "../../dist/herald.mjs";
import { FakeClock, fakeWebSocket, settle } from "./fakes.mjs";

const AUTH = { user_id: "alice", connection_id: 7, expires_at: 1_800_003_600, channel: "user:alice", node_id: "n1" };

/** A client on a fake socket and clock, connected as alice unless `connected` is false. */
async function setup(options = {}, { connected = true } = {}) {
  const clock = new FakeClock();
  const { WebSocket, sockets } = fakeWebSocket();
  const events = [];
  const client = new Client("ws://herald.test/ws", { token: "T1", WebSocket, clock, random: () => 0, ...options });
  for (const name of ["connecting", "connected", "disconnected", "message", "error"]) {
    client.on(name, (value) => events.push([name, value]));
  }
  await settle();
  if (connected) {
    sockets[0].open();
    sockets[0].receive({ type: "auth_success", data: AUTH });
  }
  return { client, clock, sockets, events, socket: () => sockets[sockets.length - 1] };
}

test("connects, authenticates with an auth frame and reports who it is", async () => {
  const { client, sockets, events } = await setup();
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "ws://herald.test/ws");
  assert.deepEqual(sockets[0].sent[0], { type: "auth", data: { token: "T1" } });
  assert.equal(client.state, "connected");
  const connected = events.find(([name]) => name === "connected")[1];
  assert.equal(connected.userId, "alice");
  assert.equal(connected.connectionId, 7);
  assert.equal(sockets[0].binaryType, "arraybuffer");
});

test("each command resolves with its own answer, whatever the order of the answers", async () => {
  const { client, socket } = await setup();
  const first = client.publish("group:1", { n: 1 });
  const second = client.publish("group:1", { n: 2 }, { type: "alert" });
  const [a, b] = socket().commands("publish");
  assert.deepEqual(a.data, { channel: "group:1", data: { n: 1 } });
  assert.deepEqual(b.data, { channel: "group:1", data: { n: 2 }, type: "alert" });
  assert.notEqual(a.message_id, b.message_id);
  socket().receive({ type: "ack", message_id: b.message_id, data: { message_id: "srv-2", offset: 2, epoch: "E" } });
  socket().receive({ type: "ack", message_id: a.message_id, data: { message_id: "srv-1" } });
  assert.deepEqual(await first, { messageId: "srv-1", offset: undefined, epoch: undefined });
  assert.deepEqual(await second, { messageId: "srv-2", offset: 2, epoch: "E" });
});

test("an error answer rejects with the server's code; no answer rejects with timeout", async () => {
  const { client, clock, socket } = await setup({ timeout: 5000 });
  const refused = client.presence("room:1");
  socket().receive({ type: "error", message_id: socket().last("presence").message_id, data: { code: "forbidden", message: "no" } });
  await assert.rejects(refused, (error) => error instanceof HeraldError && error.code === "forbidden");
  const silent = client.history("feed:1", { limit: 5 });
  assert.deepEqual(socket().last("history").data, { channel: "feed:1", limit: 5 });
  await clock.advance(4999);
  let settled = false;
  silent.catch(() => {}).finally(() => (settled = true));
  await settle();
  assert.equal(settled, false);
  await clock.advance(1);
  await assert.rejects(silent, (error) => error.code === "timeout");
});

test("history, presence and markRead turn answers into the application's names", async () => {
  const { client, socket } = await setup();
  const history = client.history("feed:1");
  socket().ack("history", {
    channel: "feed:1", epoch: "E", offset: 2, recovered: true,
    publications: [{ channel: "feed:1", type: "article", message_id: "m1", offset: 1, epoch: "E", timestamp: 5, data: { n: 1 } }],
  });
  const page = await history;
  assert.equal(page.publications[0].messageId, "m1");
  assert.deepEqual(page.publications[0].data, { n: 1 });
  const presence = client.presence("room:1");
  socket().ack("presence", { channel: "room:1", connections: 3, users: [{ user_id: "bob", connections: 3 }] });
  assert.deepEqual((await presence).users, [{ userId: "bob", connections: 3 }]);
  const read = client.markRead("group:7", "m1", { offset: 1 });
  assert.deepEqual(socket().last("mark_read").data, { channel: "group:7", message_id: "m1", offset: 1 });
  socket().ack("mark_read", { channel: "group:7", message_id: "m1", offset: 1 });
  assert.deepEqual(await read, { channel: "group:7", messageId: "m1", offset: 1 });
});

test("commands wait for the connection, within a bound, and go out after the subscribes", async () => {
  const { client, sockets } = await setup({ maxQueuedCommands: 1 }, { connected: false });
  const sub = client.subscribe("feed:1");
  const queued = client.publish("feed:1", "hi");
  await assert.rejects(client.publish("feed:1", "too many"), (error) => error.code === "queue_full");
  sockets[0].open();
  assert.deepEqual(sockets[0].sent.map((frame) => frame.type), ["auth"]);
  sockets[0].receive({ type: "auth_success", data: AUTH });
  assert.deepEqual(sockets[0].sent.map((frame) => frame.type), ["auth", "subscribe", "publish"]);
  sockets[0].ack("publish", { message_id: "m" });
  assert.equal((await queued).messageId, "m");
  assert.equal(sub.subscribed, false);
  sockets[0].ack("subscribe", { channel: "feed:1", epoch: "E", offset: 0 });
  assert.equal(sub.subscribed, true);
});

test("a command after disconnect() is rejected at once, and disconnect rejects the queue", async () => {
  const { client } = await setup({}, { connected: false });
  const queued = client.publish("feed:1", 1);
  client.disconnect();
  await assert.rejects(queued, (error) => error.code === "disconnected");
  await assert.rejects(client.publish("feed:1", 2), (error) => error.code === "disconnected");
});

test("commands in flight when the connection drops are rejected as disconnected", async () => {
  const { client, socket } = await setup();
  const inFlight = client.publish("feed:1", 1);
  socket().serverClose(1006);
  await assert.rejects(inFlight, (error) => error.code === "disconnected");
});

test("deliveries reach the client and the subscription, and move the position", async () => {
  const { client, socket, events } = await setup();
  const sub = client.subscribe("feed:1");
  const got = [];
  sub.on("message", (m) => got.push(m.data.n));
  socket().ack("subscribe", { channel: "feed:1", epoch: "E", offset: 4 });
  assert.deepEqual(sub.position, { epoch: "E", offset: 4 });
  socket().receive({ type: "message", channel: "feed:1", message_id: "m5", offset: 5, epoch: "E", timestamp: 1, from: "bob", data: { n: 5 } });
  socket().receive({ type: "message", channel: "feed:1", message_id: "m5", offset: 5, epoch: "E", timestamp: 1, data: { n: 5 } });
  socket().receive({ type: "notification", channel: "user:alice", message_id: "x", timestamp: 2, data: { n: 0 } });
  assert.deepEqual(got, [5]);
  assert.deepEqual(sub.position, { epoch: "E", offset: 5 });
  const messages = events.filter(([name]) => name === "message").map(([, m]) => m);
  assert.deepEqual(messages.map((m) => [m.channel, m.type, m.messageId]), [["feed:1", "message", "m5"], ["user:alice", "notification", "x"]]);
  assert.equal(messages[0].from, "bob");
});

test("after a reconnect a subscription recovers from its position: replayed messages arrive once", async () => {
  const { client, clock, sockets, socket, events } = await setup();
  const sub = client.subscribe("feed:1");
  const got = [];
  const recovered = [];
  sub.on("message", (m) => got.push(m.offset));
  sub.on("recovered", (r) => recovered.push(r));
  socket().ack("subscribe", { channel: "feed:1", epoch: "E", offset: 0 });
  socket().receive({ type: "message", channel: "feed:1", message_id: "a", offset: 1, epoch: "E", data: 1 });
  socket().serverClose(1006);
  assert.deepEqual(events.at(-1), ["disconnected", { code: 1006, reason: "", reconnect: true }]);
  assert.deepEqual(clock.pendingDelays(), [500]);
  await clock.advance(500);
  assert.equal(sockets.length, 2);
  socket().open();
  socket().receive({ type: "auth_success", data: { ...AUTH, connection_id: 8 } });
  assert.deepEqual(socket().last("subscribe").data, { channel: "feed:1", offset: 1, epoch: "E" });
  socket().ack("subscribe", { channel: "feed:1", epoch: "E", offset: 3, recovered: true });
  assert.deepEqual(recovered, [{ channel: "feed:1", from: { epoch: "E", offset: 1 }, to: { epoch: "E", offset: 3 } }]);
  for (const offset of [2, 3, 3, 4]) socket().receive({ type: "message", channel: "feed:1", message_id: `m${offset}`, offset, epoch: "E", data: offset });
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.deepEqual(sub.position, { epoch: "E", offset: 4 });
});

test("a recovery the server cannot honour reports resync and continues from the server's position", async () => {
  const { client, clock, socket } = await setup();
  const sub = client.subscribe("feed:1", { position: { epoch: "OLD", offset: 9 } });
  const resyncs = [];
  const got = [];
  sub.on("resync", (r) => resyncs.push(r));
  sub.on("message", (m) => got.push(m.offset));
  assert.deepEqual(socket().last("subscribe").data, { channel: "feed:1", offset: 9, epoch: "OLD" });
  socket().ack("subscribe", { channel: "feed:1", epoch: "NEW", offset: 2, recovered: false });
  assert.deepEqual(resyncs, [{ channel: "feed:1", from: { epoch: "OLD", offset: 9 }, to: { epoch: "NEW", offset: 2 }, cause: "subscribe" }]);
  socket().receive({ type: "message", channel: "feed:1", message_id: "m3", offset: 3, epoch: "NEW", data: 3 });
  assert.deepEqual(got, [3]);
  // A gap while connected: the server's resync frame moves the position.
  socket().receive({ type: "resync", data: { channel: "feed:1", epoch: "NEW", offset: 7, recovered: false } });
  assert.deepEqual(resyncs[1], { channel: "feed:1", from: { epoch: "NEW", offset: 3 }, to: { epoch: "NEW", offset: 7 }, cause: "gap" });
  assert.deepEqual(sub.position, { epoch: "NEW", offset: 7 });
  await clock.advance(0);
});

test("a channel without history resubscribes without a position", async () => {
  const { client, clock, socket } = await setup();
  client.subscribe("group:1");
  socket().ack("subscribe", { channel: "group:1" });
  socket().receive({ type: "message", channel: "group:1", message_id: "x", data: 1 });
  socket().serverClose(1001, "server shutting down, reconnect");
  await clock.advance(500);
  socket().open();
  socket().receive({ type: "auth_success", data: AUTH });
  assert.deepEqual(socket().last("subscribe").data, { channel: "group:1" });
});

test("back-off grows while attempts fail and starts over after a success", async () => {
  const { clock, sockets, socket } = await setup({ random: () => 1 }, { connected: false });
  const delays = [];
  for (let i = 0; i < 4; i++) {
    socket().serverClose(1006);
    delays.push(...clock.pendingDelays());
    await clock.advance(clock.pendingDelays()[0]);
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000]);
  socket().open();
  socket().receive({ type: "auth_success", data: AUTH });
  socket().serverClose(1006);
  assert.deepEqual(clock.pendingDelays().filter((d) => d === 1000), [1000]);
  assert.equal(sockets.length, 5);
});

for (const [code, label] of [[4009, "too many connections"], [4001, "a refused static token"], [4003, "an expired static token"]]) {
  test(`close ${code} (${label}) stops reconnecting`, async () => {
    const { client, clock, sockets, socket, events } = await setup();
    socket().serverClose(code);
    assert.deepEqual(events.at(-1), ["disconnected", { code, reason: "", reconnect: false }]);
    await clock.advance(60_000);
    assert.equal(sockets.length, 1);
    assert.equal(client.state, "disconnected");
  });
}

test("close 4003 with getToken reconnects with a new token", async () => {
  let n = 0;
  const { clock, sockets, socket, events } = await setup({ token: undefined, getToken: async () => `T${++n}` }, { connected: false });
  socket().open();
  assert.deepEqual(socket().sent[0].data, { token: "T1" });
  socket().receive({ type: "auth_success", data: AUTH });
  socket().serverClose(1006);
  await clock.advance(500);
  socket().open();
  assert.deepEqual(socket().sent[0].data, { token: "T1" }, "the same token after an ordinary drop");
  socket().receive({ type: "auth_success", data: AUTH });
  socket().serverClose(4003, "token expired");
  assert.deepEqual(events.at(-1), ["disconnected", { code: 4003, reason: "token expired", reconnect: true }]);
  await clock.advance(500);
  socket().open();
  assert.deepEqual(socket().sent[0].data, { token: "T2" });
  assert.equal(sockets.length, 3);
});

test("the token is refreshed with the refresh command before it expires", async () => {
  let n = 0;
  const clock = new FakeClock();
  const { WebSocket, sockets } = fakeWebSocket();
  const client = new Client("ws://h/ws", { WebSocket, clock, getToken: () => `T${++n}`, refreshMargin: 60_000, pingInterval: 1e9 });
  await settle();
  sockets[0].open();
  const now = clock.now() / 1000;
  sockets[0].receive({ type: "auth_success", data: { ...AUTH, expires_at: now + 100 } });
  // A quarter of a 100 s life is less than the 60 s margin: refresh 75 s in.
  await clock.advance(74_999);
  assert.equal(sockets[0].commands("refresh").length, 0);
  await clock.advance(1);
  assert.deepEqual(sockets[0].last("refresh").data, { token: "T2" });
  sockets[0].ack("refresh", { expires_at: now + 3700 });
  await settle();
  // A 3625 s life left: refresh 60 s before its end.
  await clock.advance(3625_000 - 60_000 - 1);
  assert.equal(sockets[0].commands("refresh").length, 1);
  await clock.advance(1);
  assert.deepEqual(sockets[0].last("refresh").data, { token: "T3" });
  client.disconnect();
});

test("silence brings a ping; no answer to it drops the connection and reconnects", async () => {
  const { clock, sockets, socket, events } = await setup({ pingInterval: 20_000, pongTimeout: 10_000 });
  await clock.advance(19_999);
  assert.equal(socket().commands("ping").length, 0);
  socket().receive({ type: "message", channel: "user:alice", message_id: "x", data: 1 });
  await clock.advance(19_999);
  assert.equal(socket().commands("ping").length, 0, "a frame restarts the silence timer");
  await clock.advance(1);
  assert.equal(socket().commands("ping").length, 1);
  socket().receive({ type: "pong", data: {} });
  await clock.advance(20_000);
  assert.equal(socket().commands("ping").length, 2);
  await clock.advance(9_999);
  assert.equal(socket().closedWith, undefined);
  await clock.advance(1);
  assert.equal(sockets[0].closedWith.code, 4000);
  assert.deepEqual(events.at(-1), ["disconnected", { code: 1006, reason: "no answer to ping", reconnect: true }]);
  await clock.advance(500);
  assert.equal(sockets.length, 2);
});

test("a late event from an abandoned socket changes nothing", async () => {
  const { client, clock, sockets } = await setup({ pingInterval: 1000, pongTimeout: 1000 });
  await clock.advance(2000);
  assert.equal(sockets[0].closedWith.code, 4000);
  sockets[0].receive({ type: "message", channel: "user:alice", message_id: "late", data: 1 });
  sockets[0].serverClose(1006);
  await clock.advance(500);
  assert.equal(sockets.length, 2);
  assert.equal(client.state, "connecting");
});

test("binary deliveries are split at the first newline into header and payload bytes", async () => {
  const { client, socket } = await setup();
  const got = [];
  client.on("message", (m) => got.push(m));
  const header = new TextEncoder().encode(JSON.stringify({ type: "message", channel: "user:alice", message_id: "b1", timestamp: 3 }));
  const frame = new Uint8Array([...header, 0x0a, 1, 0x0a, 2]);
  socket().receive(frame.buffer);
  assert.equal(got.length, 1);
  assert.equal(got[0].binary, true);
  assert.deepEqual([...got[0].data], [1, 0x0a, 2]);
});

test("the browser's online event reconnects at once instead of waiting out the back-off", async () => {
  const listeners = new Map();
  globalThis.addEventListener = (name, fn) => listeners.set(name, fn);
  globalThis.removeEventListener = (name) => listeners.delete(name);
  try {
    const { client, clock, sockets, socket } = await setup({ random: () => 1 });
    for (let i = 0; i < 3; i++) {
      socket().serverClose(1006);
      await clock.advance(clock.pendingDelays()[0]);
    }
    socket().serverClose(1006);
    assert.deepEqual(clock.pendingDelays(), [8000]);
    listeners.get("online")();
    await settle();
    assert.equal(sockets.length, 5);
    assert.deepEqual(clock.pendingDelays(), []);
    client.disconnect();
    assert.equal(listeners.has("online"), false);
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("unsubscribe tells the server and stops the subscription's events", async () => {
  const { client, socket } = await setup();
  const sub = client.subscribe("feed:1");
  socket().ack("subscribe", { channel: "feed:1", epoch: "E", offset: 0 });
  const got = [];
  sub.on("message", (m) => got.push(m));
  const done = sub.unsubscribe();
  socket().ack("unsubscribe", { channel: "feed:1" });
  await done;
  socket().receive({ type: "message", channel: "feed:1", message_id: "a", offset: 1, epoch: "E", data: 1 });
  assert.deepEqual(got, []);
  assert.equal(client.getSubscription("feed:1"), undefined);
});

test("a getToken that fails is retried with back-off", async () => {
  let calls = 0;
  const { clock, sockets, events } = await setup(
    { token: undefined, getToken: async () => { if (++calls === 1) throw new Error("auth backend down"); return "T"; } },
    { connected: false },
  );
  assert.equal(sockets.length, 0);
  assert.deepEqual(events.at(-1), ["disconnected", { code: 1006, reason: "getToken failed: auth backend down", reconnect: true }]);
  await clock.advance(500);
  assert.equal(calls, 2);
  assert.equal(sockets.length, 1);
});

test("a queued command that times out leaves the queue", async () => {
  const { client, clock, sockets } = await setup({ timeout: 1000, minReconnectDelay: 5000 }, { connected: false });
  const late = assert.rejects(client.publish("feed:1", 1), (error) => error.code === "timeout");
  await clock.advance(1000);
  await late;
  sockets[0].open();
  sockets[0].receive({ type: "auth_success", data: AUTH });
  assert.deepEqual(sockets[0].sent.map((frame) => frame.type), ["auth"]);
});
