"""Moved to ``fastdw.bench.timing`` (one copy of the timing helpers); re-exported here."""

from fastdw.bench.timing import capability, interleaved, machine, markdown_table, setup

__all__ = ["capability", "interleaved", "machine", "markdown_table", "setup"]
