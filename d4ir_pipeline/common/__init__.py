"""Plumbing every stage shares and none owns: atomic I/O, images, run-time, processes, training loops."""
