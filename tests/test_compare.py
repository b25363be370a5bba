"""`d4ir compare`: every row on tiny budgets, skipped rows with reasons, and the cache (a rerun redoes nothing)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import d4ir_pipeline.paper.compare as compare_mod
from d4ir_pipeline.config import load_config
from d4ir_pipeline.models import build_model, save_model
from d4ir_pipeline.paper.compare import CompareConfig, RowResult, compare
from d4ir_pipeline.paper.table import format_table

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models gain nothing from two, and a shared CPU loses a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path, demo_data_root):
    """A tiny teacher, distill / evaluate configs and a compare config over the demo data (no SD rows)."""
    torch.manual_seed(0)
    teacher = save_model(build_model("unet_s", base=8, depth=1), tmp_path / "teacher")
    m = demo_data_root / "manifests"
    distill_toml = _write(
        tmp_path / "distill.toml",
        f"""
out = "{{work}}/distill"
[teacher]
checkpoint = "{teacher}"
[student]
name = "rescnn"
kwargs = {{ width = 8, blocks = 1 }}
[data]
num_workers = 0
shuffle_buffer = 8
shuffle_initial = 4
holdout_fraction = 0.2
error_min_samples = 4
[log]
every = 1
progress = false
[val]
samples = 2
size = 0
""",
    )
    evaluate_toml = _write(
        tmp_path / "evaluate.toml",
        f"""
[data]
root = "{demo_data_root}"
manifests = {{ rain = "{m}/test-rain.jsonl", haze = "{m}/test-haze.jsonl", snow = "{m}/test-snow.jsonl" }}
""",
    )
    compare_toml = _write(
        tmp_path / "compare.toml",
        f"""
rows = ["data_kd", "web", "d4ir", "noise", "dfmc"]
[stages]
distill = "{distill_toml}"
evaluate = "{evaluate_toml}"
synthesize = "{tmp_path / "no-such-synthesize.toml"}"
[budget]
steps = 3
batch = 2
patch = 16
warmup = 0
pack_images = 6
noise_samples = 6
eval_images = 1
workers = 0
[data_kd]
manifest = "{m}/teacher-train.jsonl"
root = "{demo_data_root}"
[web]
manifest = "{m}/web-degraded.jsonl"
root = "{demo_data_root}"
[noise]
size = 24
[dfmc]
z_dim = 8
g_width = 8
[eval]
figure_images = 1
figure_samples = 2
[runtime]
device = "cpu"
threads = 1
[output]
dir = "{{work}}/compare"
""",
    )
    return load_config(CompareConfig, compare_toml, work_dir=tmp_path / "work", profile="test")


def _spy_forbid(monkeypatch, calls: list[str]) -> None:
    """Make every synthesis / packing / distillation entry point record itself and fail."""

    def forbid(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called on a cached rerun")

        return f

    # compare calls the stages through the names it imports: patch them there
    monkeypatch.setattr(compare_mod, "pack_manifest_to_shards", forbid("pack_manifest_to_shards"))
    monkeypatch.setattr(compare_mod, "write_noise_shards", forbid("write_noise_shards"))
    monkeypatch.setattr(compare_mod, "train_dfmc", forbid("train_dfmc"))
    monkeypatch.setattr(compare_mod, "distill", forbid("distill"))
    monkeypatch.setattr(compare_mod, "synthesize", forbid("synthesize"))


def test_compare_rows_outputs_and_cache(env, monkeypatch):
    res = compare(env, quick=False)
    by = {r.row: r for r in res.rows}
    assert list(by) == ["input", "teacher", "data_kd", "web", "d4ir", "noise", "dfmc"]
    # the D4IR row has no synthesize config here: skipped, with the reason in the table
    assert by["d4ir"].status == "skipped" and "synthesize" in by["d4ir"].reason
    assert "Skipped rows:" in res.markdown and by["d4ir"].reason in res.markdown
    for name in ("input", "teacher", "data_kd", "web", "noise", "dfmc"):
        r = by[name]
        assert r.status == "ok", (name, r.reason)
        assert set(r.metrics) == {"rain", "haze", "snow"}
        for m in r.metrics.values():
            assert math.isfinite(m["psnr_y"]) and 0 < m["ssim_y"] <= 1
    assert by["data_kd"].samples == 6 and by["noise"].samples == 6
    assert by["data_kd"].params == by["dfmc"].params == by["web"].params
    # each student differs (different inputs), the input row is the identity's score
    assert by["data_kd"].metrics != by["noise"].metrics
    assert "Degraded input" in res.markdown and "SD model" in res.markdown and "Teacher:" in res.markdown
    doc = json.loads(res.table_json.read_text())
    assert [r["row"] for r in doc["rows"]] == list(by)
    assert doc["header"]["sd"]["kind"] == "none"
    for f in ("inputs", "restorations"):
        assert res.figures[f].is_file() and res.figures[f].stat().st_size > 1000

    # rerun: nothing is packed, generated, synthesised or distilled again; the same table
    calls: list[str] = []
    _spy_forbid(monkeypatch, calls)
    again = compare(env, quick=False)
    assert calls == []
    assert again.markdown == res.markdown
    assert all(all(r.cached.values()) for r in again.rows if r.status == "ok")


def test_quick_budget_and_missing_inputs_are_skipped(env, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(
        env,
        rows=("data_kd", "noise"),
        data_kd=dataclasses.replace(env.data_kd, manifest=str(tmp_path / "nope.jsonl")),
        quick=dataclasses.replace(
            env.quick,
            **{k: getattr(env.budget, k) for k in ("batch", "patch", "workers")},
            steps=2,
            pack_images=4,
            noise_samples=0,
            eval_images=1,
        ),
    )
    res = compare(cfg, quick=True)
    by = {r.row: r for r in res.rows}
    assert by["data_kd"].status == "skipped" and "nope.jsonl" in by["data_kd"].reason
    # noise_samples = 0 means "as many as D4IR", which did not run
    assert by["noise"].status == "skipped" and "D4IR" in by["noise"].reason
    assert "(--quick): 2 steps" in res.markdown


def test_format_table_is_deterministic_and_lists_skips():
    header = {
        "teacher": {"spec": {"name": "t"}, "path": "/t", "note": "n", "weights_sha256": "ab" * 32, "params": 2_000_000},
        "student": {"spec": {"name": "s", "kwargs": {"width": 8}}, "params": 20_000, "ratio": 0.01},
        "sd": {"id": "tiny", "note": "TINY RANDOM SD"},
        "budget": {"steps": 5, "batch": 2, "patch": 16, "seed": 0},
        "quick": True,
        "y_channel": True,
        "test_images": {"rain": 3},
    }
    rows = [
        RowResult(
            "teacher",
            "Teacher",
            "ok",
            metrics={"rain": {"psnr_y": 30.0, "ssim_y": 0.9}},
            average={"psnr_y": 30.0, "ssim_y": 0.9},
            params=2_000_000,
        ),
        RowResult("noise", "Noise", "skipped", reason="no inputs"),
    ]
    text = format_table(header, rows, ["rain"])
    assert text == format_table(header, rows, ["rain"])
    assert "| Teacher | 30.00 / 0.9000 | 30.00 / 0.9000 | 2.00M | - |" in text
    assert "- Noise: no inputs" in text and "TINY RANDOM SD" in text


def test_demo_profile_config_loads():
    from d4ir_pipeline.config import load_stage_config

    for profile in ("demo", "smoke", "sd15"):
        if not (REPO / "stages" / profile / "compare.toml").is_file():
            pytest.fail(f"stages/{profile}/compare.toml is missing")
        cfg = load_stage_config(
            CompareConfig, "compare", profile=profile, config=REPO / "stages" / profile / "compare.toml"
        )
        assert cfg.rows and cfg.quick.steps <= cfg.budget.steps


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    """`d4ir compare --profile smoke --quick` in a subprocess: every row finite, JSON and both figures."""
    import subprocess
    import sys

    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "d4ir_pipeline.cli",
        "compare",
        "--profile",
        "smoke",
        "--quick",
        "--work-dir",
        str(work),
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((work / "compare" / "table.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"input", "teacher", "data_kd", "web", "d4ir", "sd_text", "noise", "dfmc"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert all(math.isfinite(m["psnr_y"]) and math.isfinite(m["ssim_y"]) for m in r["metrics"].values())
    assert (work / "compare" / "inputs.png").is_file() and (work / "compare" / "restorations.png").is_file()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "compare" / "table.md").read_text() in again.stdout


def test_text_prompt_bank_matches_pipeline_text_encoding(tiny_sd_path, tmp_path):
    from safetensors.torch import load_file

    from d4ir_pipeline.paper.compare import write_text_prompt_bank
    from d4ir_pipeline.stage1.sd import encode_text, load_img2img_pipeline

    prompts = {"rain": "a photo in heavy rain", "snow": "a photo in snow"}
    out = write_text_prompt_bank(str(tiny_sd_path), prompts, tmp_path / "bank")
    tokens = load_file(str(out / "tokens.safetensors"))
    assert tokens["tokens"].shape == (2, 77, 32) and torch.equal(tokens["tokens"], tokens["centroids"])
    meta = json.loads((out / "bank.json").read_text())
    assert meta["weathers"] == ["rain", "snow"] and meta["K"] == 77 and meta["D"] == 32
    from d4ir_pipeline.stage1.prompt_bank import PromptBank

    bank = PromptBank.load(out)  # what synthesis reads
    assert bank.weathers == ["rain", "snow"] and bank.rows_for("snow") == [1]
    pipe = load_img2img_pipeline(str(tiny_sd_path), device="cpu", attention="sdpa")
    ref = encode_text(pipe, [prompts["rain"], prompts["snow"]])
    torch.testing.assert_close(tokens["tokens"], ref.float())
