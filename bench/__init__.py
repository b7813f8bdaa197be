"""lmq's benchmarks (see bench/README.md): run as `python -m bench.<name>`."""
