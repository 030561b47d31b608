"""The Wasm host: wasmtime components implementing the inferlet API (inferlets/wit), their scheduler and
the sandbox."""
