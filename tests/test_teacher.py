"""Demo reference teacher: training runs, resumes exactly, is deterministic; the committed one meets its bar."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from d4ir_pipeline.common.images import psnr
from d4ir_pipeline.config import load_config
from d4ir_pipeline.demo.reference_teacher import (
    ReferenceTeacherConfig,
    TeacherBarError,
    evaluate_pairs,
    load_pairs,
    train_teacher,
)
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import count_params, load_model, model_spec, reference_teacher_path

SMOKE = Path(__file__).resolve().parent.parent / "stages" / "smoke" / "teacher.toml"
WEATHERS = ("rain", "haze", "snow")


def _cfg(work: Path, data: Path, *sets: str) -> ReferenceTeacherConfig:
    return load_config(ReferenceTeacherConfig, SMOKE, [f"data.root={json.dumps(str(data))}", *sets], work_dir=work)


def _cfg_manifests(data: Path) -> list[str]:
    m = data / "manifests"
    return [
        f"data.train_manifest={json.dumps(str(m / 'teacher-train.jsonl'))}",
        "data.test_manifests=" + json.dumps([str(m / f"test-{w}.jsonl") for w in WEATHERS]),
    ]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def test_train_resume_and_determinism(tmp_path, demo_data_root):
    sets = _cfg_manifests(demo_data_root)
    # 1. uninterrupted run
    full = train_teacher(_cfg(tmp_path / "a", demo_data_root, *sets))
    assert full.finished and full.steps == 6 and full.resumed_from == 0
    assert set(full.metrics) == set(WEATHERS)
    for m in full.metrics.values():
        assert m["images"] == 2 and np.isfinite(m["psnr"]) and 0 < m["identity_psnr"] < 100
        assert m["gain_db"] == pytest.approx(m["psnr"] - m["identity_psnr"])
    # 2. interrupted after 3 steps, then rerun: resumes from the saved state
    part = train_teacher(_cfg(tmp_path / "b", demo_data_root, *sets, "train.stop_after=3"))
    assert not part.finished and part.steps == 3 and not part.metrics
    rest = train_teacher(_cfg(tmp_path / "b", demo_data_root, *sets))
    assert rest.finished and rest.resumed_from == 3 and rest.steps == 6
    a, b = _weights(full.out_dir), _weights(rest.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert rest.metrics == full.metrics
    steps = [
        r["step"] for r in map(json.loads, (rest.out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert steps == list(range(1, 7)), "metrics.jsonl must hold each step once after a resume"
    # 3. a fresh identical run gives identical weights (deterministic)
    again = train_teacher(_cfg(tmp_path / "c", demo_data_root, *sets))
    c = _weights(again.out_dir)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # 4. a changed config is not silently resumed
    with pytest.raises(D4IRError, match="different config"):
        train_teacher(_cfg(tmp_path / "b", demo_data_root, *sets, "train.lr=0.5"))


def test_publish_only_when_the_bar_is_met(tmp_path, demo_data_root):
    sets = _cfg_manifests(demo_data_root)
    pub = tmp_path / "published"
    with pytest.raises(TeacherBarError, match="does not beat the identity"):
        train_teacher(
            _cfg(
                tmp_path / "w",
                demo_data_root,
                *sets,
                "eval.min_gain_db=100.0",
                f"output.publish_dir={json.dumps(str(pub))}",
            )
        )
    assert not (pub / "model.json").exists()
    res = train_teacher(_cfg(tmp_path / "w", demo_data_root, *sets, f"output.publish_dir={json.dumps(str(pub))}"))
    assert res.published_to == pub
    readme = (pub / "README.md").read_text()
    assert "d4ir train-teacher --profile smoke" in readme and "| rain | 2 |" in readme
    model = load_model(pub)
    assert model_spec(model)["name"] == "nafnet_s"


def test_augmentation_keeps_input_and_target_aligned():
    from dataclasses import replace

    from d4ir_pipeline.demo.reference_teacher import TrainSection, sample_batch

    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    pairs = [{"id": "a", "weather": "rain", "input": img, "target": img.clone()}]
    cfg = replace(TrainSection(), batch_size=6, patch_size=16, exposure=(0.5, 0.5), channel_shuffle=True)
    x, y = sample_batch(pairs, cfg, torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 16, 16) and torch.equal(x, y)  # same crop, flip, gain and channel order
    assert x.max() <= 0.5 + 1e-6
    x2, _ = sample_batch(pairs, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # seeded


def test_psnr_agrees_with_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, b, data_range=255.0, max_db=100.0) == pytest.approx(
        peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9
    )
    assert psnr(a, a, data_range=255.0, max_db=100.0) == 100.0


# ---------------------------------------------------------------------------------------
# the committed reference teacher


REF = reference_teacher_path()
needs_ref = pytest.mark.skipif(
    not (REF / "model.json").is_file(), reason="no committed reference teacher yet (make teacher)"
)


@needs_ref
def test_reference_teacher_loads_and_is_small():
    model = load_model(REF)
    assert model_spec(model)["name"] == "demo_teacher"
    assert (REF / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    meta = json.loads((REF / "model.json").read_text())
    assert meta["params"] == count_params(model)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)


@needs_ref
def test_reference_teacher_beats_identity_by_3db_and_readme_is_true(demo_data_root):
    """Re-measure on the demo test sets: >= 3 dB over the identity per weather, as the README states."""
    model = load_model(REF)
    readme = (REF / "README.md").read_text()
    pairs = []
    for w in WEATHERS:
        pairs += load_pairs(str(demo_data_root / "manifests" / f"test-{w}.jsonl"), str(demo_data_root), check_hash=True)
    metrics = evaluate_pairs(model, pairs)
    for w in WEATHERS:
        m = metrics[w]
        assert m["gain_db"] >= 3.0, f"{w}: teacher {m['psnr']:.2f} dB vs identity {m['identity_psnr']:.2f} dB"
        row = re.search(rf"^\| {w} \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", readme, re.M)
        assert row, f"README has no row for {w}"
        assert int(row.group(1)) == m["images"]
        assert float(row.group(2)) == pytest.approx(m["psnr"], abs=0.02)
        assert float(row.group(4)) == pytest.approx(m["identity_psnr"], abs=0.02)
