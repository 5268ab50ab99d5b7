"""Tools: the demo, benchmarks, synthetic parts and the local brokers they start."""
