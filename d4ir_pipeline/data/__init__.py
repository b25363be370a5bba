"""Input image sets: manifests (JSON Lines records), tree scanning and the paired benchmark layouts."""
