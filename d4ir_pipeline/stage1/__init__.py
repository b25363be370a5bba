"""Stage one: web-degraded images -> DPA -> prompt bank; web-clean images + prompts -> CCD -> shard set."""
