"""Moved to ``fastdw.bench.timing`` (one copy of the timing helpers); re-exported here."""

from fastdw.bench.timing import (
    capability,
    denormals_flushed,
    interleaved,
    machine,
    markdown_table,
    setup,
    use_cpu_time,
)

__all__ = ["capability", "denormals_flushed", "interleaved", "machine", "markdown_table", "setup",
           "use_cpu_time"]
