"""The degradation-aware prompt adapter: config, networks, losses, data views, training loop, report."""
