"""stage1.dpa."""
