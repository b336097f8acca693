/** Where a client keeps its checkpoint (cursor and epoch), so that a reload resumes. */

export interface Checkpoint {
  epoch: string;
  cursor: number;
}

export interface CheckpointStore {
  load(): Checkpoint | null;
  save(checkpoint: Checkpoint): void;
  clear(): void;
}

/** A store in memory only: nothing survives a reload. */
export class MemoryCheckpointStore implements CheckpointStore {
  private value: Checkpoint | null;

  constructor(initial: Checkpoint | null = null) {
    this.value = initial;
  }

  load(): Checkpoint | null {
    return this.value;
  }

  save(checkpoint: Checkpoint): void {
    this.value = { ...checkpoint };
  }

  clear(): void {
    this.value = null;
  }
}

/** The minimal part of the Web Storage API used here (sessionStorage, localStorage). */
export interface KeyValueStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/**
 * A checkpoint in Web Storage under `signalbox:checkpoint:<consumer>`. With sessionStorage
 * each tab keeps its own; give each reader of one tab its own `consumer` name.
 */
export class WebCheckpointStore implements CheckpointStore {
  readonly key: string;

  constructor(private readonly storage: KeyValueStorage, consumer = "default") {
    this.key = `signalbox:checkpoint:${consumer}`;
  }

  load(): Checkpoint | null {
    let raw: string | null;
    try {
      raw = this.storage.getItem(this.key);
    } catch {
      return null; // storage refused (private mode, quota): start as if new
    }
    if (raw === null) return null;
    try {
      const value: unknown = JSON.parse(raw);
      if (isCheckpoint(value)) return { epoch: value.epoch, cursor: value.cursor };
    } catch {
      // unreadable: fall through and start as if new
    }
    return null;
  }

  save(checkpoint: Checkpoint): void {
    try {
      this.storage.setItem(this.key, JSON.stringify(checkpoint));
    } catch {
      // a full or refused storage costs the resume after a reload, never the live stream
    }
  }

  clear(): void {
    try {
      this.storage.removeItem(this.key);
    } catch {
      // nothing to do
    }
  }
}

function isCheckpoint(value: unknown): value is Checkpoint {
  if (typeof value !== "object" || value === null) return false;
  const v = value as Record<string, unknown>;
  return typeof v.epoch === "string" && Number.isSafeInteger(v.cursor) && (v.cursor as number) >= 0;
}
