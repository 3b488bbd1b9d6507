import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffCeiling, backoffDelay } from "../../dist/herald.mjs";

const bounds = { minDelay: 500, maxDelay: 20000 };

test("the ceiling doubles from twice the floor up to the maximum", () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 7].map((attempt) => backoffCeiling(attempt, bounds));
  assert.deepEqual(ceilings, [1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]);
});

test("the delay is spread over the whole range between the floor and the ceiling", () => {
  assert.equal(backoffDelay(3, bounds, () => 0), 500);
  assert.equal(backoffDelay(3, bounds, () => 0.5), 500 + 0.5 * 7500);
  assert.ok(backoffDelay(3, bounds, () => 0.999999) < 8000);
  assert.ok(backoffDelay(3, bounds, () => 0.999999) > 7999);
});

test("a very long run of failures stays at the maximum and finite", () => {
  assert.equal(backoffCeiling(10_000, bounds), 20000);
  assert.equal(backoffDelay(10_000, bounds, () => 1), 20000);
  assert.equal(backoffCeiling(-3, bounds), 1000);
});

test("a floor above the maximum wins", () => {
  assert.equal(backoffCeiling(0, { minDelay: 5000, maxDelay: 1000 }), 5000);
});
