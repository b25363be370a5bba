"""Runtime helpers: the CPU thread cap that keeps training threads and data workers within the cores."""

from __future__ import annotations

import pytest
import torch

from d4ir_pipeline import runtime


@pytest.fixture()
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cap_lowers_threads_to_leave_a_core_per_worker(monkeypatch, restore_threads) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    torch.set_num_threads(4)
    assert runtime.cap_cpu_threads(1) == (4, 3)
    assert torch.get_num_threads() == 3
    assert runtime.cap_cpu_threads(8) == (3, 1)  # more workers than cores: still one thread


def test_cap_never_raises_threads(monkeypatch, restore_threads) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    torch.set_num_threads(1)
    assert runtime.cap_cpu_threads(0) == (1, 1)
    assert torch.get_num_threads() == 1


def test_usable_cpus_is_positive() -> None:
    assert runtime.usable_cpus() >= 1
