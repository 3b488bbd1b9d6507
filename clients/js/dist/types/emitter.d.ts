/** A small typed event emitter: `on` returns a function that removes the listener. */
export type Listener<T> = (value: T) => void;
export declare class Emitter<Events extends {
    [name: string]: unknown;
}> {
    private listeners;
    /** Calls `listener` on every `event` until the returned function is called. */
    on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void;
    /** Calls `listener` on the next `event` only. */
    once<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void;
    off<K extends keyof Events>(event: K, listener: Listener<Events[K]>): void;
    /**
     * Calls the listeners in the order they were added. A listener that throws
     * does not stop the others nor corrupt the client's state: its error is
     * rethrown on a later tick, where it reaches the platform's error reporting.
     */
    protected emit<K extends keyof Events>(event: K, value: Events[K]): void;
}
