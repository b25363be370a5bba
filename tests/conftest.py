"""Shared fixtures: offline hub, a tiny random SD folder and the demo data (session-scoped)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: on 2 shared cores, OpenMP threads stall each other (10-100x slower
# steps were measured under load); results do not depend on it.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Real-weight tests run only with D4IR_REAL_WEIGHTS=1 (they need local SD/CLIP/teacher files)."""
    if os.environ.get("D4IR_REAL_WEIGHTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs real weights: set D4IR_REAL_WEIGHTS=1 and the model paths")
    for item in items:
        if "real_weights" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random SD 1.x-layout folder, written once per test session."""
    from d4ir_pipeline.demo.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory):
    """The embedded demo data set (seed 0), generated once per test session."""
    from d4ir_pipeline.demo.data import build_demo_data

    root = tmp_path_factory.mktemp("demo-data")
    build_demo_data(root, seed=0)
    return root
