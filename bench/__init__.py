"""fastdw benchmarks: `python -m bench.<name>`."""
