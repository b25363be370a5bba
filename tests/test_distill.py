"""Stage two: shard streaming, exact resume after SIGKILL, DDP, the label cache and bad input.

Everything runs on tiny shard sets built by testing.make_shardset (the real shard-set writer) and tiny models.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.config import load_config
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, save_model
from d4ir_pipeline.models.checkpoint import CheckpointMismatchError
from d4ir_pipeline.shardset.format import ShardSetError
from d4ir_pipeline.shardset.reader import open_shardset
from d4ir_pipeline.stage2.distill import DistillConfig, distill
from d4ir_pipeline.stage2.labels import label
from d4ir_pipeline.stage2.stream import Stats, StreamSpec, epoch_shards, worker_batches
from d4ir_pipeline.testing import make_shardset, relist_shardset

REPO = Path(__file__).resolve().parent.parent
TEACHER = "d4ir_pipeline.models.students:LocalCNN"  # importable in subprocesses too


# ---------------------------------------------------------------------------------------
# helpers


def make_teacher(path: Path, spec: str = TEACHER, **kw) -> Path:
    torch.manual_seed(1)
    save_model(build_model(spec, **({"width": 8, "layers": 2} | kw) if spec == TEACHER else kw), path)
    return path


def overrides(tmp: Path, **extra) -> list[str]:
    base = {
        "output.dir": f"'{tmp / 'distill'}'",
        "data.shards": f"'{tmp / 'shards'}'",
        "teacher.checkpoint": f"'{tmp / 'teacher'}'",
        "student.name": "'rescnn'",
        "student.kwargs": "{width = 8, blocks = 1}",
        "data.patch": "24",
        "data.batch_size": "4",
        "data.num_workers": "0",
        "data.shuffle_buffer": "8",
        "data.shuffle_initial": "4",
        "data.holdout_fraction": "0.0",
        "val.samples": "0",
        "train.steps": "6",
        "train.warmup_steps": "2",
        "train.ckpt_every": "3",
        "log.every": "1",
        "log.progress": "false",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def cfg_of(tmp: Path, **extra) -> DistillConfig:
    return load_config(DistillConfig, None, overrides(tmp, **extra))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    make_shardset(tmp_path / "shards")
    make_teacher(tmp_path / "teacher")
    return tmp_path


# ---------------------------------------------------------------------------------------
# streaming


def stream_spec(shards, **kw) -> dict:
    """StreamSpec fields for a small stream over ``shards`` (single rank and worker unless overridden)."""
    spec = dict(shards=shards, label_dir=None, label_ext="teacher.png", seed=0, rank=0, world=1, workers=1,
                patch=24, batch_size=4, flips=True, buffer=8, initial=4, holdout=0.0)  # fmt: skip
    return spec | kw


def test_epoch_split_is_seeded_and_disjoint(setup: Path) -> None:
    shardset = open_shardset(setup / "shards")
    spec = stream_spec(shardset.shards, seed=3, world=2, workers=2)
    del spec["rank"]
    for epoch in (0, 1):
        parts = [[s.name for s in epoch_shards(StreamSpec(rank=r, **spec), epoch, w)] for r in (0, 1) for w in (0, 1)]
        flat = [n for p in parts for n in p]
        assert sorted(flat) == sorted(s.name for s in shardset.shards)  # every shard once per epoch
        assert all(len(p) == 1 for p in parts)
    orders = {
        tuple(s.name for s in epoch_shards(StreamSpec(rank=0, **spec | {"world": 1, "workers": 1}), e, 0))
        for e in range(6)
    }
    assert len(orders) > 1  # the order changes with the epoch ...
    again = [s.name for s in epoch_shards(StreamSpec(rank=0, **spec | {"world": 1, "workers": 1}), 2, 0)]
    assert again == [s.name for s in epoch_shards(StreamSpec(rank=0, **spec | {"world": 1, "workers": 1}), 2, 0)]


def test_worker_stream_resumes_at_cursor(setup: Path) -> None:
    shardset = open_shardset(setup / "shards")
    spec = StreamSpec(**stream_spec(shardset.shards))
    it = worker_batches(spec, 0, 0, 0, Stats())
    first = [next(it) for _ in range(12)]  # 48 samples: crosses an epoch boundary (32 per epoch)
    assert {b["cursor"][1] for b in first} == {0, 1}
    w, ep, idx = first[4]["cursor"]
    it2 = worker_batches(spec, 0, ep, idx, Stats())
    for want in first[5:]:
        got = next(it2)
        assert got["keys"] == want["keys"]
        assert torch.equal(got["x"], want["x"])  # same crops and flips
    keys0 = [k for b in first[:8] for k in b["keys"]]
    assert len(set(keys0)) == 32  # one epoch = every sample once


# ---------------------------------------------------------------------------------------
# resume, DDP


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_sigkill_resume_matches_uninterrupted(setup: Path) -> None:
    # 2 workers and a checkpoint every 3 steps: resume also rotates which worker delivers next
    extra = {"train__steps": 16, "train__ckpt_every": 3, "data__num_workers": 2, "data__patch": 32}
    cfg_file = setup / "empty.toml"
    cfg_file.write_text("")
    killed_over = overrides(setup, student__tag="'killed'", **extra)
    cmd = [sys.executable, "-m", "d4ir_pipeline.cli", "distill", "--config", str(cfg_file)]
    for o in killed_over:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = setup / "distill" / "killed" / "ckpt" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert latest.exists(), err[-2000:]
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at < 16 and not (setup / "distill" / "killed" / "result.json").exists(), "run ended before the kill"

    resumed = distill(load_config(DistillConfig, None, killed_over))
    assert resumed.resumed_from == killed_at
    full = distill(cfg_of(setup, student__tag="'full'", **extra))
    assert full.resumed_from == 0
    a, b = weights(resumed.out_dir), weights(full.out_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{k} differs after resume")
    # metrics lines of the killed run past its checkpoint were dropped, none duplicated
    steps = [
        json.loads(line)["step"]
        for line in (resumed.out_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 17))
    # rerunning a finished run does nothing
    again = distill(load_config(DistillConfig, None, killed_over))
    assert again.steps == 16 and torch.equal(weights(again.out_dir)["head.weight"], a["head.weight"])


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_ddp_two_ranks_disjoint_samples(setup: Path) -> None:
    cfg_file = setup / "empty.toml"
    cfg_file.write_text("")
    over = overrides(setup, train__steps=3, log__sample_keys="true", runtime__device="'cpu'")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "d4ir_pipeline.cli",
        "distill",
        "--config",
        str(cfg_file),
    ]
    for o in over:
        cmd += ["--set", o]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = setup / "distill" / "rescnn"
    keys = {}
    for r in (0, 1):
        lines = [json.loads(x) for x in (run / f"keys-r{r}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3]
        keys[r] = [k for x in lines for k in x["keys"]]
        assert len(keys[r]) == 12
    assert not set(keys[0]) & set(keys[1])  # ranks see disjoint samples
    shards_of = [{k.split("-")[0] for k in keys[r]} for r in (0, 1)]
    assert not shards_of[0] & shards_of[1]  # ... because they read disjoint shards
    assert (run / "student" / "model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert json.loads((run / "result.json").read_text())["steps"] == 3


# ---------------------------------------------------------------------------------------
# label cache


class Pointwise(nn.Module):
    """A 1x1-conv teacher: its output at a pixel depends on that pixel only, so crops commute with it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.6, 0.1], [0.0, 0.3, 0.4]])[..., None, None])
            self.conv.bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_label_cache_targets_match_teacher_on_same_crop(setup: Path) -> None:
    make_teacher(setup / "teacher", spec=f"{__name__}:Pointwise")
    cfg = cfg_of(setup, labels__format="'npy'", train__steps=2)
    res = label(cfg)
    assert res.samples == 32 and res.shards == 4 and res.skipped == 0
    assert (res.labels_dir / "labels.json").is_file() and res.labels_dir.parent.name == "labels"
    assert label(cfg).seconds == 0.0  # complete: nothing redone
    # the cached target of every crop (after flips) equals the teacher applied to that crop
    shardset = open_shardset(setup / "shards")
    spec = StreamSpec(**stream_spec(shardset.shards, label_dir=str(res.labels_dir), label_ext="teacher.npy"))
    teacher = Pointwise().eval()
    it = worker_batches(spec, 0, 0, 0, Stats())
    for _ in range(3):
        b = next(it)
        with torch.no_grad():
            want = teacher(b["x"].float() / 255).clamp(0, 1)
        torch.testing.assert_close(b["t"].float(), want, atol=2e-3, rtol=0)  # float16 storage
    r = distill(cfg)
    assert r.targets.startswith("labels:")
    off = distill(cfg_of(setup, labels__use="'off'", student__tag="'no-cache'", train__steps=2))
    assert off.targets == "teacher"


def test_label_rerun_redoes_a_damaged_shard_of_a_complete_cache(setup: Path) -> None:
    """The refusal says "rerun the command that wrote it": `d4ir label` on a complete cache used to return at once."""
    cfg = cfg_of(setup, labels__format="'npy'", labels__use="'require'", train__steps=1)
    res = label(cfg)
    listed = json.loads((res.labels_dir / "labels.json").read_text())["shards"]
    victim = res.labels_dir / listed[2]["name"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match=f"{listed[2]['name']}: sha256"):
        distill(cfg)
    again = label(cfg)
    assert again.seconds > 0 and (again.samples, again.shards) == (res.samples, res.shards)
    assert json.loads((res.labels_dir / "labels.json").read_text())["shards"] == listed  # redone byte-identical
    assert distill(cfg).targets.startswith("labels:")


def test_label_require_without_cache_is_clear(setup: Path) -> None:
    with pytest.raises(D4IRError, match="d4ir label"):
        distill(cfg_of(setup, labels__use="'require'"))


# ---------------------------------------------------------------------------------------
# bad input


def test_undecodable_sample_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_shardset(tmp_path / "shards", bad_keys=("k001-0003",))
    make_teacher(tmp_path / "teacher")
    with caplog.at_level(logging.WARNING, logger="d4ir_pipeline.stage2.distill"):
        r = distill(cfg_of(tmp_path, train__steps=9, data__max_error_fraction=0.1, data__error_min_samples=1))
    assert r.bad_samples >= 1
    msgs = [m for m in caplog.messages if "k001-0003" in m]
    assert msgs and "synth-r000-000001.tar" in msgs[0] and "not_image" in msgs[0]


def test_error_fraction_exceeded_fails(tmp_path: Path) -> None:
    make_shardset(tmp_path / "shards", bad_keys=tuple(f"k00{i}-000{j}" for i in range(4) for j in range(3)))
    make_teacher(tmp_path / "teacher")
    with pytest.raises(D4IRError, match="max_error_fraction"):
        distill(cfg_of(tmp_path, train__steps=9, data__max_error_fraction=0.1, data__error_min_samples=8))


def test_truncated_shard_is_skipped_with_shard_and_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_shardset(tmp_path / "shards")
    victim = root / "synth-r000-000002.tar"
    with tarfile.open(victim) as tf:
        members = tf.getmembers()
    cut = members[10].offset_data + 100  # in the middle of the 4th sample's files
    victim.write_bytes(victim.read_bytes()[:cut])
    # a shard damaged before it was hashed: verification passes, reading does not
    relist_shardset(root)
    make_teacher(tmp_path / "teacher")
    with caplog.at_level(logging.WARNING, logger="d4ir_pipeline.stage2.distill"):
        r = distill(cfg_of(tmp_path, train__steps=12, data__max_error_fraction=0.5, data__error_min_samples=1))
    assert r.bad_samples >= 5  # the partial sample and the 4 after it, at least once
    msgs = [m for m in caplog.messages if "synth-r000-000002.tar" in m]
    assert any("truncated" in m and "k002-000" in m for m in msgs), msgs


def test_changed_shard_is_refused(setup: Path) -> None:
    shard = setup / "shards" / "synth-r000-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match="synth-r000-000001.tar: sha256"):
        distill(cfg_of(setup))
    relist_shardset(setup / "shards", complete=False)
    with pytest.raises(ShardSetError, match="incomplete"):
        open_shardset(setup / "shards")
    with pytest.raises(ShardSetError, match="no shardset.json"):
        open_shardset(setup / "nowhere")


def test_too_few_shards_for_readers(setup: Path) -> None:
    with pytest.raises(ShardSetError, match="lower `data.num_workers`"):
        distill(cfg_of(setup, data__num_workers=5))


def test_teacher_key_mismatch_lists_keys(setup: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(2\): body\.4\.bias"):
        distill(cfg_of(setup, teacher__arch=f"'{TEACHER}'", teacher__kwargs="{width = 8, layers = 3}"))
    make_teacher(setup / "teacher-3", width=8, layers=3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint \(2\): body\.4\.bias"):
        distill(
            cfg_of(
                setup,
                teacher__checkpoint=f"'{setup / 'teacher-3' / 'model.safetensors'}'",
                teacher__arch=f"'{TEACHER}'",
                teacher__kwargs="{width = 8, layers = 2}",
            )
        )


class Shrink(nn.Module):
    """An 'image-to-image' model that halves its input: not usable as a student."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_student_output_size_mismatch(setup: Path) -> None:
    with pytest.raises(D4IRError, match=r"returned \(4, 3, 12, 12\) for an input of \(4, 3, 24, 24\)"):
        distill(cfg_of(setup, student__name=f"'{__name__}:Shrink'", student__kwargs="{}"))


def test_tensorboard_events_mirror_the_metrics(setup: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = distill(cfg_of(setup, train__steps=3, log__tensorboard="true"))
    rows = [json.loads(x) for x in (r.out_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    ev = EventAccumulator(str(r.out_dir / "tensorboard"))
    ev.Reload()
    assert [(e.step, e.value) for e in ev.Scalars("loss")] == [(x["step"], pytest.approx(x["loss"])) for x in rows]
    assert not (setup / "distill" / "rescnn-off" / "tensorboard").exists()
    off = distill(cfg_of(setup, train__steps=1, student__tag="'rescnn-off'"))
    assert not (off.out_dir / "tensorboard").exists()  # off by default


def test_resume_with_changed_config_or_shard_set_is_refused(setup: Path) -> None:
    first = distill(cfg_of(setup, train__steps=3))
    run = json.loads((first.out_dir / "run.json").read_text())
    assert run["shardset_sha256"] == sha256_file(setup / "shards" / "shardset.json")
    with pytest.raises(D4IRError, match=r"train.lr"):
        distill(cfg_of(setup, train__steps=3, train__lr=0.1))
    # the same folder name, another shard set: refused, not silently mixed
    make_shardset(setup / "shards", seed=7)
    with pytest.raises(D4IRError, match=r"trained on shard set"):
        distill(cfg_of(setup, train__steps=3))
