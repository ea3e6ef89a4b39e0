"""The throughput benchmark: corpus generator, engine and reference loops (`python -m bench.run`)."""
