"""Attention, KV and elementwise kernels behind one interface: torch reference on CPU, FlashInfer on CUDA."""
