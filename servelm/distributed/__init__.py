"""Process groups, passed explicitly to whatever needs them (no module-level globals)."""
from servelm.distributed.group import ParallelGroup, shard_range, without_communication

__all__ = ["ParallelGroup", "shard_range", "without_communication"]
