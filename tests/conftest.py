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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts and ends with one intra-op thread, whatever a test (or the code) set meanwhile."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`real_weights` tests run only with D4IR_REAL_WEIGHTS=1; `cuda` tests only where torch sees a GPU.

    The files that hold `slow` tests (a minute or more each) come first, each file's tests in
    their written order: `make test` hands out whole files in this order (``--dist loadfile
    --no-loadscope-reorder``), so the longest files start at once instead of one of them
    starting last while the other worker has finished (xdist's own order, by test count, ran the
    benchmark file alone for its last 144 s). tests/test_suite.py checks the order.
    """
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file and test order kept otherwise
    real = os.environ.get("D4IR_REAL_WEIGHTS") == "1"
    cuda = torch.cuda.is_available()
    skip_real = pytest.mark.skip(reason="needs real weights: set D4IR_REAL_WEIGHTS=1 and the model paths")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "real_weights" in item.keywords and not real:
            item.add_marker(skip_real)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)


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
