import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { runInNewContext } from "node:vm";
import { FakeClock, fakeWebSocket, settle } from "./fakes.mjs";

test("the browser bundle defines the global Herald with a working Client", async () => {
  const source = readFileSync(new URL("../../dist/herald.js", import.meta.url), "utf8");
  const { WebSocket, sockets } = fakeWebSocket();
  // A bare context stands for a page: the bundle must need nothing but the language and WebSocket.
  const context = { WebSocket, setTimeout, clearTimeout, TextDecoder, atob };
  context.globalThis = context;
  runInNewContext(source, context);
  const Herald = context.Herald;
  assert.equal(typeof Herald.Client, "function");
  assert.equal(typeof Herald.HeraldError, "function");
  const client = new Herald.Client("ws://h/ws", { token: "T", clock: new FakeClock() });
  await settle();
  assert.equal(sockets.length, 1, "the page's WebSocket is used when none is passed");
  sockets[0].open();
  assert.deepEqual(sockets[0].sent[0], { type: "auth", data: { token: "T" } });
  client.disconnect();
});
