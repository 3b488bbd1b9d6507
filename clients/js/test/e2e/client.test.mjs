// The client against a real herald binary, in Node with the `ws` package as its WebSocket.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client } from "../../dist/herald.mjs";
import { Herald, Redis, waitFor } from "./herald.mjs";

/** `ws`'s WebSocket, remembering every socket so that a test can cut one off. */
function trackedWebSocket() {
  const sockets = [];
  class Tracked extends WebSocket {
    constructor(url) {
      super(url);
      sockets.push(this);
    }
  }
  return { WebSocket: Tracked, sockets };
}

const servers = [];
const clients = [];
after(async () => {
  for (const client of clients) client.disconnect();
  for (const server of servers) await server.stop();
});

async function startHerald(options) {
  const herald = new Herald(options);
  servers.push(herald);
  await herald.start();
  return herald;
}

/** A client that records what it sees; fast reconnects so the tests do not wait out back-off. */
function newClient(herald, options = {}) {
  const { WebSocket, sockets } = trackedWebSocket();
  const client = new Client(herald.url, { WebSocket, minReconnectDelay: 50, maxReconnectDelay: 200, ...options });
  clients.push(client);
  const seen = { connected: [], disconnected: [], errors: [] };
  client.on("connected", (info) => seen.connected.push(info));
  client.on("disconnected", (info) => seen.disconnected.push(info));
  client.on("error", (error) => seen.errors.push(error));
  return { client, sockets, seen };
}

function record(sub) {
  const log = { messages: [], recovered: [], resync: [] };
  sub.on("message", (m) => log.messages.push(m));
  sub.on("recovered", (r) => log.recovered.push(r));
  sub.on("resync", (r) => log.resync.push(r));
  return log;
}

test("connects with a token; receives HTTP and client publishes; answers history and presence", async () => {
  const herald = await startHerald();
  const { client, seen } = newClient(herald, { token: herald.token("alice") });
  const personal = [];
  client.on("message", (m) => m.channel === "user:alice" && personal.push(m));
  const feed = record(client.subscribe("feed:news"));
  await waitFor(() => client.getSubscription("feed:news").subscribed, "the subscribe ack");
  assert.equal(seen.connected[0].userId, "alice");

  await herald.publish("feed:news", { n: 1 });
  await herald.publish("user:alice", { hello: "alice" }, { type: "notification" });
  const own = await client.publish("feed:news", { n: 2 });
  assert.equal(typeof own.messageId, "string");
  assert.equal(own.offset, 2);
  await waitFor(() => feed.messages.length === 2 && personal.length === 1, "the deliveries");
  assert.deepEqual(feed.messages.map((m) => [m.data.n, m.offset]), [[1, 1], [2, 2]]);
  assert.equal(feed.messages[1].messageId, own.messageId);
  assert.equal(feed.messages[1].from, "alice");
  assert.deepEqual([personal[0].type, personal[0].data], ["notification", { hello: "alice" }]);

  const page = await client.history("feed:news", { limit: 10 });
  assert.deepEqual(page.publications.map((m) => m.data.n), [1, 2]);
  client.subscribe("room:lobby");
  await waitFor(() => client.getSubscription("room:lobby").subscribed, "the room subscription");
  const presence = await client.presence("room:lobby");
  assert.deepEqual(presence.users, [{ userId: "alice", connections: 1 }]);
  await assert.rejects(client.publish("nope:x", 1), (error) => error.code === "unknown_namespace");
  const read = await client.markRead("feed:news", own.messageId);
  assert.equal(read.messageId, own.messageId);
  client.disconnect();
  assert.deepEqual(seen.disconnected.at(-1), { code: 1000, reason: "client disconnect", reconnect: false });
});

test("three connections of one user all get a notification; two users chat in a group", async () => {
  const herald = await startHerald();
  const tabs = [1, 2, 3].map(() => newClient(herald, { token: herald.token("alice", { channels: ["group:42"] }) }));
  const bob = newClient(herald, { token: herald.token("bob", { channels: ["group:42"] }) });
  const inbox = tabs.map(({ client }) => {
    const got = [];
    client.on("message", (m) => got.push(m));
    return got;
  });
  const aliceGroup = record(tabs[0].client.subscribe("group:42"));
  const bobGroup = record(bob.client.subscribe("group:42"));
  await waitFor(
    () => tabs.every(({ seen }) => seen.connected.length === 1) &&
      tabs[0].client.getSubscription("group:42").subscribed && bob.client.getSubscription("group:42").subscribed,
    "four connections and two group subscriptions",
  );
  await herald.publish("user:alice", { text: "ping" }, { type: "notification" });
  await waitFor(() => inbox.every((got) => got.some((m) => m.type === "notification")), "the notification in every tab");
  await bob.client.publish("group:42", { text: "hi alice" });
  await tabs[0].client.publish("group:42", { text: "hi bob" });
  await waitFor(() => aliceGroup.messages.length === 2 && bobGroup.messages.length === 2, "both chat lines on both sides");
  for (const log of [aliceGroup, bobGroup]) {
    assert.deepEqual(log.messages.map((m) => [m.from, m.data.text]), [["bob", "hi alice"], ["alice", "hi bob"]]);
  }
});

test("getToken; a dropped connection recovers what was published meanwhile, once and in order", async () => {
  const herald = await startHerald();
  let tokens = 0;
  const { client, sockets, seen } = newClient(herald, { getToken: async () => (tokens++, herald.token("bob")) });
  const feed = record(client.subscribe("feed:live"));
  await waitFor(() => client.getSubscription("feed:live").subscribed, "the subscribe ack");
  for (let n = 1; n <= 3; n++) await herald.publish("feed:live", { n });
  await waitFor(() => feed.messages.length === 3, "the first three messages");

  sockets.at(-1).terminate();
  await waitFor(() => seen.disconnected.length === 1, "the client to notice the drop");
  for (let n = 4; n <= 8; n++) await herald.publish("feed:live", { n });
  await waitFor(() => seen.connected.length === 2 && feed.recovered.length === 1, "the reconnect and recovery");
  for (let n = 9; n <= 10; n++) await herald.publish("feed:live", { n });
  await waitFor(() => feed.messages.length >= 10, "all ten messages");

  assert.deepEqual(feed.messages.map((m) => m.data.n), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(feed.messages.map((m) => m.offset), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(feed.recovered[0].from.offset, 3);
  assert.deepEqual(feed.resync, []);
  assert.equal(tokens, 1, "a dropped connection reuses the token");
});

test("a server killed and restarted (memory mode) reports resync, then the stream goes on", async () => {
  const herald = await startHerald();
  const { client, seen } = newClient(herald, { token: herald.token("carol") });
  const feed = record(client.subscribe("feed:crash"));
  await waitFor(() => client.getSubscription("feed:crash").subscribed, "the subscribe ack");
  for (let n = 1; n <= 3; n++) await herald.publish("feed:crash", { n });
  await waitFor(() => feed.messages.length === 3, "the messages before the crash");
  const before = feed.messages[2].epoch;

  await herald.kill();
  await waitFor(() => seen.disconnected.length >= 1, "the client to notice the crash");
  await herald.start();
  await waitFor(() => feed.resync.length === 1, "the resync after the restart");
  // In-memory history died with the process: a new epoch, and the client is told so.
  assert.equal(feed.resync[0].from.epoch, before);
  assert.notEqual(feed.resync[0].to.epoch, before);
  assert.deepEqual(feed.recovered, []);
  await herald.publish("feed:crash", { n: 4 });
  await waitFor(() => feed.messages.length === 4, "the message after the restart");
  assert.deepEqual(feed.messages.map((m) => m.data.n), [1, 2, 3, 4]);
  assert.equal(feed.messages[3].epoch, feed.resync[0].to.epoch);
});

test("a server killed and restarted in Redis mode: the client recovers every message once, in order", async () => {
  const redis = new Redis();
  servers.push(redis);
  await redis.start();
  const herald = await startHerald({ extraConfig: `[redis]\nurl = "${redis.url}"\n` });
  const { client, seen } = newClient(herald, { token: herald.token("frank") });
  const feed = record(client.subscribe("feed:durable"));
  await waitFor(() => client.getSubscription("feed:durable").subscribed, "the subscribe ack");
  for (let n = 1; n <= 3; n++) await herald.publish("feed:durable", { n });
  await waitFor(() => feed.messages.length === 3, "the messages before the crash");

  await herald.kill();
  await waitFor(() => seen.disconnected.length >= 1, "the client to notice the crash");
  await herald.start();
  // Published as soon as the node is back: before or after the client's reconnect, it must arrive once.
  for (let n = 4; n <= 6; n++) await herald.publish("feed:durable", { n });
  await waitFor(() => seen.connected.length === 2 && feed.recovered.length === 1, "the reconnect and recovery");
  await herald.publish("feed:durable", { n: 7 });
  await waitFor(() => feed.messages.length >= 7, "all seven messages");
  assert.deepEqual(feed.messages.map((m) => m.data.n), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(feed.resync, []);
  assert.equal(new Set(feed.messages.map((m) => m.epoch)).size, 1, "Redis kept the epoch");
});

test("token refresh keeps the connection past the first token's exp", async () => {
  const herald = await startHerald({ leeway: "1s" });
  let tokens = 0;
  const { client, seen } = newClient(herald, { getToken: () => (tokens++, herald.token("dave", { ttl: 3 })) });
  await waitFor(() => seen.connected.length === 1, "the connection");
  // Without a refresh the server closes at exp + 1 s, at most 4 s from now.
  const firstExpiry = seen.connected[0].expiresAt * 1000 + 1000;
  await waitFor(() => Date.now() > firstExpiry + 1000 && tokens >= 3, "two refreshes past the first expiry", 15_000);
  assert.deepEqual(seen.disconnected, []);
  assert.equal(client.state, "connected");
  const pong = await client.command("ping");
  assert.deepEqual(pong, {});
});

test("a refused token with no getToken stops reconnecting", async () => {
  const herald = await startHerald();
  const forged = herald.token("eve").slice(0, -4) + "AAAA";
  const { client, sockets, seen } = newClient(herald, { token: forged });
  await waitFor(() => seen.disconnected.length === 1, "the refusal");
  assert.deepEqual(seen.disconnected[0], { code: 4001, reason: "authentication failed", reconnect: false });
  assert.equal(seen.errors[0].code, "auth_failed");
  assert.equal(client.state, "disconnected");
  // Give a reconnect every chance to happen (many back-off periods), then check there was none.
  await new Promise((done) => setTimeout(done, 500));
  assert.equal(sockets.length, 1);
});
