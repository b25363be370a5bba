"""Shards: synthesis end to end on the tiny SD (32 px, 2 denoising steps), resume, kill, ranks, verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import d4ir_pipeline.shardset.writer as writer_mod
from d4ir_pipeline.common.io import atomic_write_json, sha256_file
from d4ir_pipeline.config import load_config
from d4ir_pipeline.data.manifests import ImageRecord, write_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.shardset.cli import shards_group
from d4ir_pipeline.shardset.format import shard_urls
from d4ir_pipeline.shardset.reader import read_shard, verify_shardset
from d4ir_pipeline.shardset.writer import merge_shardset
from d4ir_pipeline.stage1.synthesize import SynthesizeConfig, plan_shards, shards_for_rank, synthesize
from d4ir_pipeline.testing import write_bank

N_GOOD = 8
SAMPLE_FIELDS = {"key", "source_id", "source_sha256", "weather", "prompt_id", "strength", "guidance", "steps",
                 "scheduler", "seed", "width", "height"}  # fmt: skip


def _image(path: Path, w: int, h: int, seed: int) -> ImageRecord:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.int32)
    arr = np.clip(arr + rng.integers(-40, 40, arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG" if path.suffix == ".png" else "JPEG", quality=90)
    return ImageRecord(f"clean/{path.stem}", path.relative_to(path.parents[1]).as_posix(), None,
                       sha256_file(path), w, h, "clean", "web-clean", path.stem)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    recs = [_image(root / "clean" / f"img-{i:02d}.{'png' if i % 2 else 'jpg'}", 40 + 7 * i, 64 - 3 * i, i)
            for i in range(N_GOOD)]  # fmt: skip
    write_manifest(root / "web-clean.jsonl", recs)
    bank = write_bank(tmp_path_factory.mktemp("bank") / "bank")
    return {"root": root, "manifest": root / "web-clean.jsonl", "bank": bank, "records": recs}


def overrides(data, sd, out, **extra) -> list[str]:
    """--set strings for a tiny run (32 px, strength 0.5 of 4 steps = 2 denoising steps)."""
    d = {
        "sd.model": str(sd),
        "data.manifest": str(data["manifest"]),
        "data.root": str(data["root"]),
        "data.resolution": 32,
        "data.min_side": 32,
        "bank.dir": str(data["bank"]),
        "ccd.steps": 4,
        "ccd.strength": 0.5,
        "ccd.guidance": 3.0,
        "output.dir": str(out),
        "output.shard_size": 3,
        "runtime.device": "cpu",
        "runtime.dtype": "float32",
        "runtime.batch_size": 4,
        "runtime.workers": 1,
    }
    d.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def make_cfg(data, sd, out, **extra) -> SynthesizeConfig:
    return load_config(SynthesizeConfig, None, overrides(data, sd, out, **extra))


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> files over every shard the manifest lists; fails on a key seen twice."""
    doc = json.loads((out / "shardset.json").read_text())
    allsamples: dict[str, dict[str, bytes]] = {}
    for s in doc["shards"]:
        for key, files in read_shard(out / s["name"]).items():
            assert key not in allsamples, f"key {key} twice"
            allsamples[key] = files
    return allsamples


@pytest.fixture(scope="module")
def first_run(data, tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "shards"
    res = synthesize(make_cfg(data, tiny_sd_path, out))
    return out, res


def test_plan_is_deterministic_and_ranks_partition_it():
    ids = [f"img{i}" for i in range(10)]
    plans = plan_shards(ids, shard_size=4, samples_per_image=2)
    assert [len(p.items) for p in plans] == [4, 4, 4, 4, 4]  # 2 records x 2 variants per shard
    assert plans == plan_shards(ids, shard_size=4, samples_per_image=2)
    owned = [p.index for r in range(3) for p in shards_for_rank(plans, r, 3)]
    assert sorted(owned) == list(range(5))
    assert plans[0].name(2) == "synth-r002-000000.tar"


def test_shards_read_back_with_tarfile_and_webdataset(first_run, data):
    import webdataset as wds

    out, res = first_run
    assert res.complete is True and res.shards_written == 3 and res.samples_written == N_GOOD
    doc = json.loads((out / "shardset.json").read_text())
    assert doc["kind"] == "d4ir-shardset" and doc["complete"] is True
    assert [s["name"] for s in doc["shards"]] == [f"synth-r000-00000{i}.tar" for i in range(3)]
    assert doc["num_samples"] == N_GOOD and doc["skipped"] == {} and doc["dropped"] == {}
    for key in ("config", "config_hash", "models", "versions", "inputs"):
        assert doc[key], key
    for s in doc["shards"]:  # reproducible tar headers, and the recorded size / hash
        path = out / s["name"]
        assert (path.stat().st_size, sha256_file(path)) == (s["bytes"], s["sha256"])
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", ""), m.name
    plain = samples_of(out)
    assert len(plain) == N_GOOD
    ids = {r.id: r for r in data["records"]}
    for files in plain.values():
        assert set(files) == {"json", "degraded.png"}
        meta = json.loads(files["json"])
        assert SAMPLE_FIELDS <= set(meta)
        assert meta["source_sha256"] == ids[meta["source_id"]].sha256
        assert meta["strength"] == 0.5 and meta["steps"] == 4 and meta["weather"] in ("rain", "haze", "snow")
        assert Image.open(__import__("io").BytesIO(files["degraded.png"])).size == (32, 32)
    urls = shard_urls(out)
    seen = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(seen) == len(set(seen)) == N_GOOD and set(seen) == set(plain)
    rep = verify_shardset(out)
    assert rep.ok and rep.complete and rep.samples == N_GOOD and not rep.unlisted and not rep.leftovers


def test_same_seed_gives_identical_bytes_and_only_regenerates_one(first_run, data, tiny_sd_path, tmp_path):
    out, _ = first_run
    again = synthesize(make_cfg(data, tiny_sd_path, tmp_path / "again"))
    a = json.loads((out / "shardset.json").read_text())["shards"]
    b = json.loads((again.out_dir / "shardset.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]  # same tars, so the same PNG bytes
    samples = samples_of(out)
    key = sorted(samples)[3]
    res = synthesize(make_cfg(data, tiny_sd_path, out), only=[key], only_out=tmp_path / "only")
    assert res.samples_written == 1
    single = (tmp_path / "only" / f"{key}.degraded.png").read_bytes()
    px_a = np.asarray(Image.open(__import__("io").BytesIO(single)), dtype=int)
    px_b = np.asarray(Image.open(__import__("io").BytesIO(samples[key]["degraded.png"])), dtype=int)
    assert np.abs(px_a - px_b).max() <= 1  # alone vs in a batch: same seed; fp32 CPU kernels agree
    assert (
        json.loads((tmp_path / "only" / f"{key}.json").read_bytes())["seed"] == json.loads(samples[key]["json"])["seed"]
    )
    with pytest.raises(D4IRError, match="unknown sample key"):
        synthesize(make_cfg(data, tiny_sd_path, out), only=["nope"])


def test_resume_keeps_verified_shards_and_redoes_damaged(first_run, data, tiny_sd_path, tmp_path):
    src, _ = first_run
    out = tmp_path / "shards"
    shutil.copytree(src, out)
    orig = {s["name"]: s["sha256"] for s in json.loads((out / "shardset.json").read_text())["shards"]}
    with open(out / "synth-r000-000001.tar", "r+b") as f:  # flip one byte
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))
    (out / "synth-r000-000002.tar").unlink()
    (out / "synth-r000-000000.tar.tmp").write_bytes(b"partial")  # an interrupted write
    rep = verify_shardset(out)
    assert not rep.ok and len(rep.damaged) == 2 and rep.leftovers == ["synth-r000-000000.tar.tmp"]
    res = synthesize(make_cfg(data, tiny_sd_path, out))
    assert (res.shards_reused, res.shards_written, res.complete) == (1, 2, True)
    now = {s["name"]: s["sha256"] for s in json.loads((out / "shardset.json").read_text())["shards"]}
    assert now == orig  # redone shards are byte-identical
    rep = verify_shardset(out)
    assert rep.ok and not rep.leftovers
    runner = CliRunner()
    assert runner.invoke(shards_group, ["verify", str(out)]).exit_code == 0
    (out / "synth-r000-000000.tar").write_bytes(b"x")
    r = runner.invoke(shards_group, ["verify", str(out)])
    assert r.exit_code == 1 and "DAMAGED synth-r000-000000.tar" in r.output


def test_a_rerun_with_nothing_to_make_leaves_shardset_json_byte_identical(first_run, data, tiny_sd_path, tmp_path):
    """Label caches and distillation runs name the set by this file's sha256 (the rerun once dropped `runtime`)."""
    src, _ = first_run
    out = tmp_path / "shards"
    shutil.copytree(src, out)
    before = sha256_file(out / "shardset.json")
    res = synthesize(make_cfg(data, tiny_sd_path, out))
    assert (res.shards_written, res.shards_reused, res.complete) == (0, 3, True)
    assert sha256_file(out / "shardset.json") == before


def test_other_config_is_refused_unless_overwrite(first_run, data, tiny_sd_path, tmp_path, monkeypatch):
    src, _ = first_run
    out = tmp_path / "shards"
    shutil.copytree(src, out)
    old_hash = json.loads((out / "shardset.json").read_text())["config_hash"]
    with pytest.raises(D4IRError, match=r"another config.*ccd\.seed"):
        synthesize(make_cfg(data, tiny_sd_path, out, ccd__seed=1))
    # speed-only keys do not change the hash: a resume may use another batch size
    checked = []
    real_check = writer_mod.check_shard_file
    monkeypatch.setattr(
        writer_mod, "check_shard_file", lambda info, **kw: checked.append(info.name) or real_check(info, **kw)
    )
    res = synthesize(make_cfg(data, tiny_sd_path, out, runtime__batch_size=2))
    assert res.shards_reused == 3 and res.shards_written == 0
    # shardset.json repeats the rank manifest's entries: still each recorded shard is hashed once
    assert sorted(checked) == sorted(s["name"] for s in json.loads((out / "shardset.json").read_text())["shards"])
    monkeypatch.undo()
    res = synthesize(make_cfg(data, tiny_sd_path, out, ccd__seed=1), overwrite=True)
    doc = json.loads((out / "shardset.json").read_text())
    assert res.shards_written == 3 and doc["complete"] and doc["config_hash"] != old_hash
    assert verify_shardset(out).ok


def test_bad_clean_images_are_skipped_and_counted(data, tiny_sd_path, tmp_path):
    root = tmp_path / "data"
    good = [_image(root / "clean" / f"ok-{i}.png", 48, 40, 100 + i) for i in range(3)]
    small = _image(root / "clean" / "small.png", 16, 16, 1)
    huge = _image(root / "clean" / "huge.png", 300, 300, 2)
    trunc = _image(root / "clean" / "trunc.png", 64, 64, 3)
    data_bytes = (root / "clean" / "trunc.png").read_bytes()
    (root / "clean" / "trunc.png").write_bytes(data_bytes[: len(data_bytes) // 2])
    (root / "clean" / "empty.png").write_bytes(b"")
    (root / "clean" / "text.png").write_text("not an image")
    fake = dict(url=None, sha256="0" * 64, width=64, height=64, weather="clean", split="web-clean")
    bad = [ImageRecord("clean/missing", "clean/missing.png", **fake), ImageRecord("clean/empty", "clean/empty.png", **fake),
           ImageRecord("clean/text", "clean/text.png", **fake)]  # fmt: skip
    write_manifest(root / "m.jsonl", [*good, small, huge, trunc, *bad])
    d = {**data, "root": root, "manifest": root / "m.jsonl"}
    res = synthesize(make_cfg(d, tiny_sd_path, tmp_path / "out", data__max_pixels=20000))
    doc = json.loads((tmp_path / "out" / "shardset.json").read_text())
    assert doc["complete"] and doc["num_samples"] == 3 == res.samples_written
    assert doc["skipped"] == {"decompression_bomb": 1, "empty": 1, "missing": 1, "not_image": 1, "too_small": 1,
                              "truncated": 1}  # fmt: skip
    assert sum(sum(s["skipped"].values()) for s in doc["shards"]) == 6  # counted in the shard that met them


def test_failed_samples_are_dropped_and_counted(data, tiny_sd_path, tmp_path, monkeypatch):
    import types

    from diffusers import AutoencoderKL

    calls = []

    def constant(self, z, *args, **kwargs):  # every decode is flat grey: retried once, then dropped
        calls.append(z.shape[0])
        return types.SimpleNamespace(sample=torch.zeros(z.shape[0], 3, 32, 32))

    monkeypatch.setattr(AutoencoderKL, "decode", constant)
    res = synthesize(make_cfg(data, tiny_sd_path, tmp_path / "out"))
    doc = json.loads((tmp_path / "out" / "shardset.json").read_text())
    assert res.dropped == doc["dropped"] == {"constant_image": N_GOOD}
    assert doc["num_samples"] == 0 and doc["complete"]
    assert sum(calls) == 2 * N_GOOD  # each sample: first seed, then the retry seed


def test_bad_sd_folder_or_bank_width_fails_before_any_work(data, tiny_sd_path, tmp_path):
    from d4ir_pipeline.stage1.sd import SDLoadError

    (tmp_path / "weights").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SDLoadError, match="not a diffusers folder"):
        synthesize(make_cfg(data, tmp_path / "weights", out))
    narrow = write_bank(tmp_path / "bank16", d=16)
    with pytest.raises(D4IRError, match=r"width D = 16.*width 32"):
        synthesize(make_cfg({**data, "bank": narrow}, tiny_sd_path, out))
    with pytest.raises(D4IRError, match="fog"):
        synthesize(make_cfg(data, tiny_sd_path, out, bank__mix={"fog": 1.0}))
    assert not out.exists()  # nothing was written


def test_urls_and_names_never_run_or_escape(first_run, data, tiny_sd_path, tmp_path):
    with pytest.raises(D4IRError, match="URL"):
        synthesize(make_cfg(data, tiny_sd_path, "pipe:cat > /tmp/x"))
    out, _ = first_run
    with pytest.raises(D4IRError, match="pipe:"):
        shard_urls(out, base="pipe:cat {name}")
    assert shard_urls(out, base="pipe:cat {name}", allow_pipe=True)[0] == "pipe:cat synth-r000-000000.tar"
    evil = tmp_path / "evil"
    evil.mkdir()
    doc = json.loads((out / "shardset.json").read_text())
    doc["shards"][0]["name"] = "../synth-r000-000000.tar"
    atomic_write_json(evil / "shardset.json", doc)
    for fn in (shard_urls, verify_shardset):
        with pytest.raises(D4IRError, match="refusing"):
            fn(evil)


def test_independent_ranks_then_merge_equal_one_process(first_run, data, tiny_sd_path, tmp_path, monkeypatch):
    """Two ranks without a process group (e.g. a Slurm array): rank 0 merges when it sees both done."""
    src, _ = first_run
    out = tmp_path / "shards"
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r1 = synthesize(make_cfg(data, tiny_sd_path, out))
    assert r1.complete is None and not (out / "shardset.json").exists() and r1.shards_written == 1
    monkeypatch.setenv("RANK", "0")
    r0 = synthesize(make_cfg(data, tiny_sd_path, out))
    assert r0.complete is True
    one = json.loads((src / "shardset.json").read_text())
    two = json.loads((out / "shardset.json").read_text())
    assert [s["name"] for s in two["shards"]] == [
        "synth-r000-000000.tar",
        "synth-r001-000001.tar",
        "synth-r000-000002.tar",
    ]
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]  # same bytes on any rank
    assert two["config_hash"] == one["config_hash"]
    assert set(samples_of(out)) == set(samples_of(src))
    r = CliRunner().invoke(shards_group, ["merge", str(out)])
    assert r.exit_code == 0 and "3/3 shards" in r.output
    assert merge_shardset(out)["shards"] == two["shards"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", D4IR_LOG_LEVEL="WARNING")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_sigkill_mid_run_then_resume(data, tiny_sd_path, tmp_path):
    out = tmp_path / "shards"
    (tmp_path / "empty.toml").write_text("")
    sets = overrides(data, tiny_sd_path, out, output__shard_size=2, ccd__samples_per_image=2)
    cmd = [sys.executable, "-m", "d4ir_pipeline.cli", "synthesize", "--config", str(tmp_path / "empty.toml")]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "shardset.json"  # written after the rank manifest (the commit point)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not manifest.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    doc = json.loads((out / "shardset.r000.json").read_text())
    assert not json.loads(manifest.read_text())["complete"] and 1 <= len(doc["shards"]) < N_GOOD
    for s in doc["shards"]:  # every recorded shard is whole
        assert sha256_file(out / s["name"]) == s["sha256"]
    res = synthesize(load_config(SynthesizeConfig, None, sets))
    assert res.complete and res.shards_reused >= 1 and res.shards_reused + res.shards_written == N_GOOD
    rep = verify_shardset(out)
    assert rep.ok and rep.complete and not rep.leftovers and not rep.unlisted
    keys = samples_of(out)  # fails on a key seen twice
    assert len(keys) == rep.samples == 2 * N_GOOD  # two variants of every good image


@pytest.mark.slow  # ~40 s on 2 busy cores: two fresh interpreters import torch + diffusers
def test_two_process_gloo_run_gives_the_same_keys(first_run, data, tiny_sd_path, tmp_path):
    src, _ = first_run
    out = tmp_path / "shards"
    (tmp_path / "empty.toml").write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "d4ir_pipeline.cli", "synthesize", "--config", str(tmp_path / "empty.toml")]  # fmt: skip
    cmd += [a for s in overrides(data, tiny_sd_path, out) for a in ("--set", s)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((src / "shardset.json").read_text())
    two = json.loads((out / "shardset.json").read_text())
    assert two["complete"] and two["world_size"] == 2
    assert {s["rank"] for s in two["shards"]} == {0, 1}
    assert set(samples_of(out)) == set(samples_of(src))
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
