"""SIE server: an inference engine for embedding models (scheduler + runtime) and its HTTP API."""
