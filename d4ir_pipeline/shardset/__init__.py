"""shardset."""
