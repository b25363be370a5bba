"""stage2."""
