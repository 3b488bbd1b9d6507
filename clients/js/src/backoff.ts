/**
 * Reconnect delays: exponential back-off with full jitter above a floor.
 *
 * Attempt `n` (0 for the first reconnect after a connection was lost) waits a
 * uniformly random time between `minDelay` and `min(maxDelay, minDelay * 2^(n+1))`.
 * The randomness spreads the reconnects of many clients that lost the same
 * server at the same moment; the floor keeps a client that keeps failing
 * from spinning.
 */
export interface BackoffOptions {
  /** The shortest wait, in milliseconds (default 500). */
  minDelay: number;
  /** The longest wait, in milliseconds (default 20000). */
  maxDelay: number;
}

/** The ceiling of the jittered wait before attempt `attempt`. */
export function backoffCeiling(attempt: number, options: BackoffOptions): number {
  const { minDelay, maxDelay } = options;
  // 2^31 is far past any useful ceiling; capping the exponent keeps it finite.
  const exponent = Math.min(Math.max(attempt, 0) + 1, 31);
  return Math.max(minDelay, Math.min(maxDelay, minDelay * 2 ** exponent));
}

/** The wait before reconnect attempt `attempt`; `random` returns a number in [0, 1). */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions,
  random: () => number = Math.random,
): number {
  const ceiling = backoffCeiling(attempt, options);
  return options.minDelay + random() * (ceiling - options.minDelay);
}
