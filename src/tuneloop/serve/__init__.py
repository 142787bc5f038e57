"""HTTP serving: FastAPI app, micro-batching, hot swap, API keys and Prometheus metrics."""
