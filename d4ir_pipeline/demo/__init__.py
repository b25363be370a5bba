"""The embedded demo: its data set, small SD, reference teacher and the `make demo` driver (not the method)."""
