"""stage1."""
