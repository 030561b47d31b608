"""The engine: runtime (Wasm host), control (pages, batcher) and executor (model, sampling)."""
