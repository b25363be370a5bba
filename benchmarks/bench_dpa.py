"""DPA training throughput (source images / s, each giving two crops) for the demo config.

``run(size)`` builds the demo data and the tiny SD in a temporary folder, then trains
the demo config (report off) and returns the images/s measured inside the training loop
(setup, data checks and the one-off VAE latent cache excluded). Wired into `make bench`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


STEPS = {"full": 40, "quick": 10, "smoke": 2}


def run(size: str = "full") -> dict:
    """Train the demo DPA config for a few steps on this machine; return the measured throughput."""
    import torch

    from d4ir_pipeline.config import load_stage_config
    from d4ir_pipeline.demo.data import build_demo_data
    from d4ir_pipeline.demo.tiny_sd import write_tiny_sd
    from d4ir_pipeline.stage1.dpa.train import DPAConfig, train_dpa

    steps = STEPS[size]
    with tempfile.TemporaryDirectory(prefix="bench-dpa-") as tmp:
        work = Path(tmp)
        build_demo_data(work / "data", seed=0)
        write_tiny_sd(work / "tiny-sd")
        cfg = load_stage_config(
            DPAConfig,
            "dpa",
            profile="demo",
            work_dir=str(work),
            overrides=[f"train.steps={steps}", "report.enabled=false", f"train.ckpt_every={steps}"],
        )
        t0 = time.perf_counter()
        res = train_dpa(cfg)
        wall = time.perf_counter() - t0
    return {
        "name": "dpa_train",
        "metric": "images_per_s",
        "value": round(res.images_per_s or 0.0, 2),
        "unit": "source images/s (2 crops each; demo config)",
        "steps": steps,
        "batch_size": cfg.train.batch_size * cfg.train.grad_accum,
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": torch.get_num_threads(),
        "wall_s_including_setup": round(wall, 1),
    }


if __name__ == "__main__":
    import argparse
    import json

    from _sizes import add_size_flags  # benchmarks/ is on sys.path (the script's folder)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(ap, quick_help="10 steps instead of 40")
    args = ap.parse_args()
    print(json.dumps(run(args.size), indent=2))
