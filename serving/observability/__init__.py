"""What operators see: tracing and drift signals (metrics and logs live beside them)."""
