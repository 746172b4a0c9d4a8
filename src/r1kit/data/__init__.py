"""The data pipeline (`r1kit prepare`) and the shard reader training uses.

Light on import: the stage libraries load only when a stage runs.
"""

from r1kit.data.config import PrepareConfig
from r1kit.data.shards import ShardDataset

__all__ = ["PrepareConfig", "ShardDataset"]
