/** Exponential backoff with full jitter: attempt n waits a random time in [0, min(cap, base·2ⁿ)). */

export interface BackoffOptions {
  /** Seconds: the ceiling of the first wait. */
  base?: number;
  /** Seconds: no wait is longer than this. */
  cap?: number;
}

export class Backoff {
  readonly base: number;
  readonly cap: number;

  constructor(options: BackoffOptions = {}, private readonly random: () => number = Math.random) {
    this.base = options.base ?? 0.5;
    this.cap = options.cap ?? 30;
    if (!(this.base > 0) || !(this.cap >= this.base)) {
      throw new RangeError("backoff needs 0 < base <= cap");
    }
  }

  /** The ceiling of attempt `attempt` (0 for the first retry), in seconds. */
  ceiling(attempt: number): number {
    return Math.min(this.cap, this.base * 2 ** Math.min(attempt, 60));
  }

  /** A wait for attempt `attempt`, in milliseconds. */
  delayMs(attempt: number): number {
    return Math.floor(this.random() * this.ceiling(attempt) * 1000);
  }
}
