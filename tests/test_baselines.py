"""Baseline input sources: packed manifests, noise shard sets and the DFMC-style GAN."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from d4ir_pipeline.data.manifests import load_manifest, open_rgb
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, load_model
from d4ir_pipeline.paper.baselines import noise_image, pack_manifest_to_shards, write_noise_shards
from d4ir_pipeline.paper.dfmc import DFMCConfig, Generator, generator_samples, info_nce, train_dfmc
from d4ir_pipeline.shardset.reader import open_shardset, read_shard, verify_shardset

STUDENT = {"name": "rescnn", "kwargs": {"width": 8, "blocks": 1}}


def _teacher() -> torch.nn.Module:
    """A small fixed 'restoration' network: seeded random weights, frozen."""
    torch.manual_seed(123)
    return build_model("unet_s", base=8, depth=2).eval()


# --------------------------------------------------------------------------- packed manifests


def test_pack_round_trip(demo_data_root, tmp_path):
    manifest = demo_data_root / "manifests" / "web-degraded.jsonl"
    out = tmp_path / "web"
    doc = pack_manifest_to_shards(manifest, demo_data_root, out, origin="web", shard_size=4, min_shards=2, limit=10)
    assert doc["complete"] and doc["num_samples"] == 10 and len(doc["shards"]) == 3  # 4 + 4 + 2
    report = verify_shardset(out)
    assert report.ok and report.samples == 10
    assert open_shardset(out).num_samples == 10  # what `distill` reads
    records = {r.id: r for r in sorted(load_manifest(manifest), key=lambda r: r.id)[:10]}
    seen = set()
    for s in doc["shards"]:
        for key, files in read_shard(out / s["name"]).items():
            meta = json.loads(files["json"])
            rec = records[meta["source_id"]]
            assert meta["key"] == key and meta["origin"] == "web" and meta["weather"] == rec.weather
            assert meta["source_sha256"] == rec.sha256
            from PIL import Image

            got = np.asarray(Image.open(io.BytesIO(files["degraded.png"])).convert("RGB"))
            assert np.array_equal(got, np.asarray(open_rgb(demo_data_root, rec)))  # lossless, unchanged
            seen.add(meta["source_id"])
    assert seen == set(records)
    # webdataset reads the same samples
    import webdataset as wds

    urls = [str(out / s["name"]) for s in doc["shards"]]
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == 10
    # rerun: reused as is; a different packing into the same folder is refused
    before = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in doc["shards"]}
    again = pack_manifest_to_shards(manifest, demo_data_root, out, origin="web", shard_size=4, min_shards=2, limit=10)
    assert again == doc and before == {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in doc["shards"]}
    with pytest.raises(D4IRError, match="another config"):
        pack_manifest_to_shards(manifest, demo_data_root, out, origin="web", shard_size=4, min_shards=2, limit=9)


def test_pack_redoes_a_damaged_shard(demo_data_root, tmp_path):
    manifest = demo_data_root / "manifests" / "teacher-train.jsonl"
    out = tmp_path / "kd"
    doc = pack_manifest_to_shards(manifest, demo_data_root, out, origin="data-kd", shard_size=3, limit=6, size=64)
    victim = out / doc["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    again = pack_manifest_to_shards(manifest, demo_data_root, out, origin="data-kd", shard_size=3, limit=6, size=64)
    assert again["shards"] == doc["shards"] and verify_shardset(out).ok
    sample = next(iter(read_shard(out / doc["shards"][0]["name"]).values()))
    assert json.loads(sample["json"])["width"] == 64  # resized + centre-cropped as synthesis does


def test_noise_shardset(tmp_path):
    doc = write_noise_shards(tmp_path / "n", num=5, size=(24, 32), kind="mixed", seed=3, shard_size=2)
    assert doc["complete"] and doc["num_samples"] == 5 and verify_shardset(tmp_path / "n").ok
    again = write_noise_shards(tmp_path / "m", num=5, size=(24, 32), kind="mixed", seed=3, shard_size=2)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in doc["shards"]]  # seeded: same bytes
    other = write_noise_shards(tmp_path / "o", num=5, size=(24, 32), kind="mixed", seed=4, shard_size=2)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in doc["shards"]]
    files = next(iter(read_shard(tmp_path / "n" / doc["shards"][0]["name"]).values()))
    assert json.loads(files["json"])["height"] == 24 and json.loads(files["json"])["origin"] == "noise"


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", ["uniform", "smooth", "mixed"])
def test_noise_image_is_seeded_sized_and_varied(kind):
    a = noise_image(kind, (40, 56), np.random.default_rng(3))
    b = noise_image(kind, (40, 56), np.random.default_rng(3))
    c = noise_image(kind, (40, 56), np.random.default_rng(4))
    assert a.shape == (40, 56, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 5  # not a constant image


def test_smooth_noise_is_smoother_than_uniform():
    rng = np.random.default_rng(0)
    u = noise_image("uniform", (64, 64), rng).astype(float)
    s = noise_image("smooth", (64, 64), rng).astype(float)

    def roughness(x: np.ndarray) -> float:  # mean neighbour difference relative to the spread
        return float(np.abs(np.diff(x, axis=1)).mean() / (x.std() + 1e-9))

    assert roughness(s) < 0.3 * roughness(u)


# --------------------------------------------------------------------------- DFMC


def test_info_nce_prefers_matching_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    matched = info_nce(a, a, 0.1)
    shuffled = info_nce(a, a.roll(1, 0), 0.1)
    assert matched < 0.1 < shuffled


def test_generator_shape_and_range():
    g = Generator(z_dim=8, width=16, patch=24)
    x = g(torch.randn(3, 8))
    assert x.shape == (3, 3, 24, 24)
    assert float(x.detach().min()) >= 0.0 and float(x.detach().max()) <= 1.0
    with pytest.raises(ValueError, match="multiple of 8"):
        Generator(patch=20)


def test_dfmc_student_learns_teacher_and_samples_are_diverse(tmp_path):
    teacher = _teacher()
    cfg = DFMCConfig(z_dim=16, g_width=16, s_lr=2e-3, ckpt_every=1000, grid=4)
    # held-out probe inputs: smooth noise images the student never sees
    rng = np.random.default_rng(9)
    probe = torch.from_numpy(np.stack([noise_image("smooth", (24, 24), rng) for _ in range(8)]))
    probe = probe.permute(0, 3, 1, 2).float() / 255.0  # (8, 3, 24, 24)
    with torch.no_grad():
        target = teacher(probe)
        torch.manual_seed(cfg.seed)
        before = float((build_model(STUDENT["name"], **STUDENT["kwargs"])(probe) - target).abs().mean())

    out = train_dfmc(teacher, STUDENT, steps=40, batch=4, patch=24, seed=0, out_dir=tmp_path / "dfmc", config=cfg)
    student = load_model(out)
    with torch.no_grad():
        after = float((student(probe) - target).abs().mean())
    assert after < 0.8 * before, (before, after)

    rows = [json.loads(line) for line in (tmp_path / "dfmc" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    first = np.mean([r["loss_student"] for r in rows[:5]])
    last = np.mean([r["loss_student"] for r in rows[-5:]])
    assert last < first
    # samples of different z differ (no full mode collapse) and the grid was written
    samples = generator_samples(tmp_path / "dfmc", 4, seed=1)
    flat = np.stack([s.astype(float).ravel() for s in samples])
    assert np.abs(flat[:, None] - flat[None]).mean(-1)[~np.eye(4, dtype=bool)].min() > 1.0
    assert (tmp_path / "dfmc" / "samples.png").is_file()


def test_dfmc_resume_matches_uninterrupted(tmp_path):
    teacher = _teacher()
    cfg = DFMCConfig(z_dim=8, g_width=8, ckpt_every=3)
    full = train_dfmc(teacher, STUDENT, steps=6, batch=2, patch=16, seed=1, out_dir=tmp_path / "a", config=cfg)

    class Stop(Exception):
        pass

    # interrupt the second run right after its step-3 checkpoint by failing the 4th teacher call pair
    calls = {"n": 0}
    real_forward = teacher.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] > 3 * 2:  # two teacher calls per step (G step + student step)
            raise Stop
        return real_forward(x)

    teacher.forward = flaky
    with pytest.raises(Stop):
        train_dfmc(teacher, STUDENT, steps=6, batch=2, patch=16, seed=1, out_dir=tmp_path / "b", config=cfg)
    assert (tmp_path / "b" / "ckpt" / "latest.json").is_file() and not (tmp_path / "b" / "student").exists()
    teacher.forward = real_forward
    with pytest.raises(D4IRError, match="different config"):
        train_dfmc(teacher, STUDENT, steps=6, batch=2, patch=16, seed=2, out_dir=tmp_path / "b", config=cfg)
    resumed = train_dfmc(teacher, STUDENT, steps=6, batch=2, patch=16, seed=1, out_dir=tmp_path / "b", config=cfg)
    a, b = load_model(full).state_dict(), load_model(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # a finished run is reused; the same folder with another teacher is refused
    with pytest.raises(D4IRError, match="another config or teacher"):
        train_dfmc(
            build_model("unet_s", base=8, depth=2),
            STUDENT,
            steps=6,
            batch=2,
            patch=16,
            seed=1,
            out_dir=tmp_path / "b",
            config=cfg,
        )
    assert (
        train_dfmc(teacher, STUDENT, steps=6, batch=2, patch=16, seed=1, out_dir=tmp_path / "b", config=cfg) == resumed
    )
