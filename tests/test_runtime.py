"""Runtime and io helpers: the CPU thread cap, metrics trimming on resume."""

from __future__ import annotations

import pytest
import torch

from d4ir_pipeline.common import runtime


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


def test_torch_threads_sets_the_count_for_the_block_and_restores_it_after_an_error(restore_threads) -> None:
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"), runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    for unset in (None, 0):  # no count given: left as it is
        with runtime.torch_threads(unset):
            assert torch.get_num_threads() == 2


def test_usable_cpus_follows_the_affinity_mask_and_falls_back_to_the_cpu_count(monkeypatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert runtime.usable_cpus() == 3  # a Slurm / container limit, not the machine's count

    def unsupported(pid):
        raise OSError("not supported")

    monkeypatch.setattr(runtime.os, "sched_getaffinity", unsupported, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 6)
    assert runtime.usable_cpus() == 6
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: None)
    assert runtime.usable_cpus() == 1


def test_trim_jsonl_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path) -> None:
    from d4ir_pipeline.common.io import trim_jsonl

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"note": "no step"}\n{"step": 2, "eval": 1}\n{"step": 3}\n{"step": 4, "lo')
    trim_jsonl(p, 2)  # the torn last line (a kill mid-write) must not fail a resume
    assert p.read_text() == '{"step": 1, "loss": 2.0}\n{"note": "no step"}\n{"step": 2, "eval": 1}\n'
    trim_jsonl(p, 2, drop=lambda r: "eval" in r)
    assert p.read_text() == '{"step": 1, "loss": 2.0}\n{"note": "no step"}\n'
    trim_jsonl(tmp_path / "missing.jsonl", 5)
    assert not (tmp_path / "missing.jsonl").exists()
