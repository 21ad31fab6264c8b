"""Local HTTP servers started by tests and benchmarks (127.0.0.1 only)."""
