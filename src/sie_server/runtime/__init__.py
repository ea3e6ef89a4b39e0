"""Model runtime: tokenization, packing, the encoder forward, heads and adapters."""
