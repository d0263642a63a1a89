"""Tensor IO: shard indexes, lazy reads, planned sharded writes, atomic output, the Hub."""
