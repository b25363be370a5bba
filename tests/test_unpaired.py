"""The CycleGAN-style unpaired restorer: it learns procedural haze removal, and resumes exactly after a stop or a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d4ir_pipeline.common.images import psnr
from d4ir_pipeline.data.manifests import ImageRecord, write_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models.checkpoint import load_model
from d4ir_pipeline.paper.unpaired import (
    HistoryPool,
    UnpairedConfig,
    degrade,
    image_set,
    train_unpaired,
    weather_classes,
)

REPO = Path(__file__).resolve().parent.parent
STUDENT = {"name": "rescnn", "kwargs": {"width": 8, "blocks": 1}}


def _scene(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Coloured rectangles on a coloured ground, one channel of each darkened: (size, size, 3) in [0, 1]."""
    img = np.empty((size, size, 3))
    img[:] = rng.uniform(0, 1, 3)
    for _ in range(6):
        y0, x0 = rng.integers(0, size, 2)
        h, w = rng.integers(4, size // 2, 2)
        c = rng.uniform(0, 1, 3)
        c[rng.integers(3)] *= 0.1
        img[y0 : y0 + h, x0 : x0 + w] = c
    return img


def _haze(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t), one transmission and grey airlight per image."""
    t, a = rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.95)
    return img * t + a * (1 - t)


def _write_set(root: Path, name: str, images: list[np.ndarray], weather: str | None) -> Path:
    recs = []
    (root / name).mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(images):
        rel = f"{name}/{i:03d}.png"
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(root / rel)
        h, w = arr.shape[:2]
        recs.append(
            ImageRecord(
                id=f"{name}/{i:03d}",
                path=rel,
                url=None,
                sha256="0" * 64,
                width=w,
                height=h,
                weather=weather,
                split=name,
            )
        )
    return write_manifest(root / f"{name}.jsonl", recs)


@pytest.fixture
def hazy_problem(tmp_path):
    """Unpaired clean and hazy images (different scenes), and a paired hazy test set."""
    rng = np.random.default_rng(0)
    clean = _write_set(tmp_path, "clean", [_scene(rng) for _ in range(24)], "clean")
    hazy = _write_set(tmp_path, "hazy", [_haze(_scene(rng), rng) for _ in range(24)], "haze")
    test_clean = [_scene(rng) for _ in range(12)]
    test_hazy = [_haze(c, rng) for c in test_clean]
    return image_set(clean, tmp_path), image_set(hazy, tmp_path), test_clean, test_hazy


def _tiny(**kw) -> UnpairedConfig:
    base = dict(batch=4, patch=16, lr=2e-3, identity_weight=0.1, g_width=8, g_blocks=1, d_width=8, d_layers=2)
    return UnpairedConfig(**{**base, "pool_size": 8, **kw})


def _weights(student_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(student_dir).state_dict()


def test_restorer_learns_procedural_haze_without_pairs(hazy_problem, tmp_path):
    clean, hazy, test_clean, test_hazy = hazy_problem
    sdir = train_unpaired(clean, hazy, STUDENT, tmp_path / "run", config=_tiny(steps=150, checkpoint_every=1000))
    model = load_model(sdir)
    x = torch.tensor(np.stack(test_hazy)).permute(0, 3, 1, 2).float()  # (12, 3, 32, 32), unseen scenes
    y = torch.tensor(np.stack(test_clean)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = model(x).clamp(0, 1)
    before, after = np.mean(psnr(x, y, per_sample=True)), np.mean(psnr(out, y, per_sample=True))
    assert after > before + 1.5, (before, after)  # measured: 11.1 -> 16.0 dB
    # the outputs of a finished run: G (the student folder), F, the sample grid, the run record
    assert (tmp_path / "run" / "degrader.safetensors").is_file() and (tmp_path / "run" / "samples.png").is_file()
    assert not (tmp_path / "run" / "ckpt").exists()
    fake = degrade(tmp_path / "run", [(c * 255).astype(np.uint8) for c in test_clean[:2]], ["haze", "haze"])
    assert fake[0].shape == (32, 32, 3) and fake[0].dtype == np.uint8


def test_stop_and_rerun_equals_uninterrupted(hazy_problem, tmp_path):
    clean, hazy, _, _ = hazy_problem
    full = train_unpaired(clean, hazy, STUDENT, tmp_path / "a", config=_tiny(steps=10, checkpoint_every=3))
    # the same run, stopped after 5 steps (a checkpoint there) and rerun to the end
    part = _tiny(steps=10, checkpoint_every=3, stop_after=5)
    train_unpaired(clean, hazy, STUDENT, tmp_path / "b", config=part)
    assert not (tmp_path / "b" / "student").exists()
    assert json.loads((tmp_path / "b" / "ckpt" / "latest.json").read_text())["step"] == 5
    resumed = train_unpaired(clean, hazy, STUDENT, tmp_path / "b", config=_tiny(steps=10, checkpoint_every=3))
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in la]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lb]
    # a finished run is returned as it is; another config in the same folder is refused
    assert train_unpaired(clean, hazy, STUDENT, tmp_path / "a", config=_tiny(steps=10, checkpoint_every=7)) == full
    with pytest.raises(D4IRError, match="another config"):
        train_unpaired(clean, hazy, STUDENT, tmp_path / "a", config=_tiny(steps=10, cycle_weight=5.0))


def test_weather_conditioning_and_history_pool(tmp_path):
    rng = np.random.default_rng(1)
    mixed = _write_set(tmp_path, "mixed", [_scene(rng) for _ in range(2)], "rain")
    unlabelled = _write_set(tmp_path, "unlabelled", [_scene(rng) for _ in range(2)], None)
    assert weather_classes(image_set(mixed, tmp_path), True) == ["rain"]
    assert weather_classes(image_set(mixed, tmp_path), False) == []
    assert weather_classes(image_set(unlabelled, tmp_path), True) == []  # one unlabelled image: unconditioned
    pool = HistoryPool(2, torch.Generator().manual_seed(0))
    imgs, labels = torch.rand(5, 3, 4, 4), torch.eye(5)
    out, out_l = pool.query(imgs, labels)
    assert out.shape == imgs.shape and torch.equal(out[:2], imgs[:2]) and len(pool.images) == 2
    # every returned image is either the one queried or one the pool held, with its own label
    for o, ol in zip(out, out_l, strict=True):
        assert any(torch.equal(o, i) and torch.equal(ol, lab) for i, lab in zip(imgs, labels, strict=True))


def test_too_small_images_are_refused(hazy_problem, tmp_path):
    clean, hazy, _, _ = hazy_problem
    with pytest.raises(D4IRError, match="smaller than the training crop"):
        train_unpaired(clean, hazy, STUDENT, tmp_path / "run", config=_tiny(steps=1, patch=40))


_RUN = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from d4ir_pipeline.paper.unpaired import UnpairedConfig, image_set, train_unpaired
root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = UnpairedConfig(steps=40, batch=4, patch=16, lr=2e-3, identity_weight=0.1, g_width=8, g_blocks=1, d_width=8,
                     d_layers=2, pool_size=8, checkpoint_every=5)
train_unpaired(image_set(root / "clean.jsonl", root), image_set(root / "hazy.jsonl", root),
               {"name": "rescnn", "kwargs": {"width": 8, "blocks": 1}}, out, config=cfg)
"""


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(hazy_problem, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-c", _RUN, str(tmp_path)]
    subprocess.run([*cmd, str(tmp_path / "a")], cwd=REPO, env=env, check=True, timeout=600)
    # a second run, killed with SIGKILL once it has written a checkpoint past step 10
    proc = subprocess.Popen([*cmd, str(tmp_path / "b")], cwd=REPO, env=env)
    latest = tmp_path / "b" / "ckpt" / "latest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "b" / "student").exists()
    subprocess.run([*cmd, str(tmp_path / "b")], cwd=REPO, env=env, check=True, timeout=600)
    wa, wb = _weights(tmp_path / "a" / "student"), _weights(tmp_path / "b" / "student")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "degrader.safetensors").read_bytes() == (
        tmp_path / "b" / "degrader.safetensors"
    ).read_bytes()
