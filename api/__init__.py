"""The OpenAI-compatible HTTP API: protocol models, one serving module per endpoint family, streaming, metrics. No Ray."""
