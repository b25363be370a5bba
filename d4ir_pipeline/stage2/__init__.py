"""Stage two: shard set -> (frozen teacher | cached labels) -> pixel-wise distillation -> student -> evaluation."""
