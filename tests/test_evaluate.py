"""Evaluation: pyiqa PSNR/SSIM agree with skimage on BT.601 Y and RGB; reports, cost; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.config import load_config
from d4ir_pipeline.data.manifests import ImageRecord, write_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, load_model, save_model
from d4ir_pipeline.stage2.evaluate import EvalConfig, evaluate, nr_metric_status

TEACHER = "d4ir_pipeline.models.students:LocalCNN"


def y_bt601(rgb01: np.ndarray) -> np.ndarray:
    """Y of BT.601 YCbCr on the [0, 1] scale (16..235 / 255): the benchmarks' MATLAB rgb2ycbcr."""
    r, g, b = rgb01[..., 0], rgb01[..., 1], rgb01[..., 2]
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def reference_scores(out: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Independent PSNR/SSIM with skimage (uint8 HWC inputs)."""
    o, t = out.astype(np.float64) / 255.0, target.astype(np.float64) / 255.0
    yo, yt = y_bt601(o), y_bt601(t)
    ssim_kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255.0}
    return {
        "psnr_y": peak_signal_noise_ratio(yt, yo, data_range=1.0),
        # SSIM on 8-bit-rounded Y, like the benchmarks' MATLAB code
        "ssim_y": structural_similarity(np.round(yt * 255), np.round(yo * 255), **ssim_kw),
        "psnr_rgb": peak_signal_noise_ratio(t, o, data_range=1.0),
        "ssim_rgb": structural_similarity(
            target.astype(np.float64), out.astype(np.float64), channel_axis=-1, **ssim_kw
        ),
    }


def make_paired_set(root: Path, weather: str, n: int = 2, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """input/ + target/ folders like Rain100L / SOTS / Snow100K, and a paired manifest."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        target = np.array(Image.fromarray(small).resize(size, Image.BILINEAR))
        streaks = (rng.random((size[1], size[0], 1)) < 0.08) * rng.integers(60, 140)
        inp = np.clip(target.astype(int) + streaks, 0, 255).astype(np.uint8)
        rel_in, rel_tg = f"test/{weather}/input/im-{i}.png", f"test/{weather}/target/im-{i}.png"
        for rel, arr in ((rel_in, inp), (rel_tg, target)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
        records.append(
            ImageRecord(
                id=f"test/{weather}/im-{i}",
                path=rel_in,
                url=None,
                sha256=sha256_file(root / rel_in),
                width=size[0],
                height=size[1],
                weather=weather,
                split="test",
                source=f"src-{i}",
                target=rel_tg,
                target_sha256=sha256_file(root / rel_tg),
            )
        )
    path = root / f"test-{weather}.jsonl"
    write_manifest(path, records)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for i, w in enumerate(("rain", "haze")):
        make_paired_set(data, w, seed=i)
    torch.manual_seed(0)
    save_model(build_model(TEACHER, width=8, layers=2), tmp_path / "teacher")
    save_model(build_model("rescnn", width=8, blocks=1), tmp_path / "distill" / "rescnn" / "student")
    return tmp_path


def cfg_of(tmp: Path, **extra: str) -> EvalConfig:
    over = {
        "output.dir": f"'{tmp / 'eval'}'",
        "distill_out": f"'{tmp / 'distill'}'",
        "runtime.device": "'cpu'",
        "teacher.checkpoint": f"'{tmp / 'teacher'}'",
        "student.name": "'rescnn'",
        "data.root": f"'{tmp / 'data'}'",
        "data.manifests": f"{{rain = '{tmp / 'data' / 'test-rain.jsonl'}', haze = '{tmp / 'data' / 'test-haze.jsonl'}'}}",
        "cost.size": "32",
        "cost.repeats": "1",
        "metrics.no_reference": "[]",
    }
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return load_config(EvalConfig, None, [f"{k}={v}" for k, v in over.items()])


def test_metrics_agree_with_skimage_and_report(setup: Path) -> None:
    res = evaluate(cfg_of(setup))
    rows = list(csv.DictReader(res.per_image_csv.open()))
    assert len(rows) == 2 * 2 * 3  # weathers x images x (input, teacher, student)
    student = load_model(setup / "distill" / "rescnn" / "student")
    data = setup / "data"
    checked = 0
    for row in rows:
        if row["model"] == "teacher":
            continue
        w, i = row["weather"], row["id"].rsplit("-", 1)[1]
        inp = np.array(Image.open(data / f"test/{w}/input/im-{i}.png"))
        tgt = np.array(Image.open(data / f"test/{w}/target/im-{i}.png"))
        if row["model"] == "input":
            out = inp
        else:
            with torch.no_grad():
                y = student(torch.from_numpy(inp).permute(2, 0, 1)[None].float() / 255)
            out = (y[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        ref = reference_scores(out, tgt)
        assert abs(float(row["psnr_y"]) - ref["psnr_y"]) < 0.01, (row, ref)
        assert abs(float(row["psnr_rgb"]) - ref["psnr_rgb"]) < 0.01, (row, ref)
        assert abs(float(row["ssim_y"]) - ref["ssim_y"]) < 0.001, (row, ref)
        assert abs(float(row["ssim_rgb"]) - ref["ssim_rgb"]) < 0.001, (row, ref)
        checked += 1
    assert checked == 8
    s = json.loads(res.summary_json.read_text())
    assert set(s["per_weather"]) == {"rain", "haze"}
    for w in ("rain", "haze"):
        assert set(s["per_weather"][w]) == {"input", "teacher", "student"}
        assert s["per_weather"][w]["teacher"]["n"] == 2
    for who in ("teacher", "student"):
        assert s["cost"][who]["params"] > 0 and s["cost"][who]["macs"] > 0 and s["cost"][who]["cpu_ms"] > 0
    md = res.summary_md.read_text()
    assert "## rain (2 images)" in md and "| teacher |" in md and "| student |" in md and "PSNR-Y" in md
    sheet = Image.open(res.contact_sheet)
    assert sheet.height > 4 * 160  # 2 weathers x 2 rows


def test_no_reference_metric_without_cached_weights_is_skipped(setup: Path, tmp_path: Path, monkeypatch) -> None:
    import pyiqa.utils.download_util as du

    monkeypatch.setattr(du, "DEFAULT_CACHE_DIR", str(tmp_path / "empty-cache"))
    ok, why = nr_metric_status("niqe")
    assert not ok and "niqe_modelparameters.mat" in why and "not in pyiqa's cache" in why
    (tmp_path / "empty-cache").mkdir()
    (tmp_path / "empty-cache" / "niqe_modelparameters.mat").write_bytes(b"x")
    assert nr_metric_status("niqe")[0]
    res = evaluate(
        cfg_of(setup, metrics__no_reference="['niqe']", data__max_images="1", report__contact_per_weather="0")
    )
    assert res.summary["no_reference"] == ["niqe"] or "niqe" in res.summary["skipped_metrics"]
    with pytest.raises(D4IRError, match="no-reference metrics"):
        nr_metric_status("not-a-metric")
    with pytest.raises(D4IRError, match="full-reference"):
        nr_metric_status("psnr")


def test_unpaired_manifest_and_missing_student(setup: Path) -> None:
    unpaired = setup / "data" / "unpaired.jsonl"
    rec = json.loads((setup / "data" / "test-rain.jsonl").read_text().splitlines()[0])
    rec.pop("target")
    rec.pop("target_sha256")
    unpaired.write_text(json.dumps(rec) + "\n")
    with pytest.raises(D4IRError, match="paired manifest"):
        evaluate(cfg_of(setup, data__manifests=f"{{rain = '{unpaired}'}}"))
    with pytest.raises(D4IRError, match="run `d4ir distill`"):
        evaluate(cfg_of(setup, student__name="'unet_s'"))


def test_bad_test_image_is_skipped_and_listed(setup: Path) -> None:
    (setup / "data" / "test" / "rain" / "input" / "im-1.png").write_bytes(b"garbage")
    res = evaluate(cfg_of(setup, report__contact_per_weather="0"))
    assert [s["id"] for s in res.summary["skipped_images"]] == ["test/rain/im-1"]
    assert res.summary["per_weather"]["rain"]["student"]["n"] == 1


def test_each_test_set_is_restored_by_its_weathers_teacher(setup: Path) -> None:
    torch.manual_seed(7)
    save_model(build_model(TEACHER, width=8, layers=2), setup / "rain-teacher")

    def teacher_rows(res) -> dict[tuple[str, str], float]:
        rows = csv.DictReader(res.per_image_csv.open())
        return {(r["weather"], r["id"]): float(r["psnr_rgb"]) for r in rows if r["model"] == "teacher"}

    both = teacher_rows(
        evaluate(cfg_of(setup, teacher__by_weather=f"{{rain = {{checkpoint = '{setup / 'rain-teacher'}'}}}}"))
    )
    default = teacher_rows(evaluate(cfg_of(setup, output__dir=f"'{setup / 'eval-default'}'")))
    rain = teacher_rows(
        evaluate(
            cfg_of(setup, output__dir=f"'{setup / 'eval-rain'}'", teacher__checkpoint=f"'{setup / 'rain-teacher'}'")
        )
    )
    assert len(both) == 4
    for (w, i), v in both.items():
        assert v == (rain if w == "rain" else default)[(w, i)], (w, i)
    assert any(rain[k] != default[k] for k in rain if k[0] == "rain")  # the two teachers really differ
