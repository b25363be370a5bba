"""The benchmark scripts still run against the current code (tiny sizes; no timing is asserted).

`make bench` is only run by hand, so without this a change to a stage's on-disk format
or API can break a benchmark silently (it happened: the synthesis benchmark wrote a
prompt bank the stage then refused). The smoke sizes are too small for the ratios to
mean anything; the tests check that every documented figure is produced and sane.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "D4IR_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_run_all_smoke_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, env=_env(), timeout=900, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res) == {"dpa", "synthesize", "distill", "deploy"}

    assert res["dpa"]["steps"] == 2 and _positive(res["dpa"]["value"])

    syn = res["synthesize"]
    for k in ("synthesize_images_per_s", "naive_images_per_s", "speedup", "speedup_end_to_end", "rss_ratio"):
        assert _positive(syn[k]), (k, syn[k])
    assert syn["speedup"] == pytest.approx(syn["synthesize_images_per_s"] / syn["naive_images_per_s"], rel=0.01)
    assert isinstance(syn["speedup_goal_met"], bool) and isinstance(syn["rss_goal_met"], bool)
    assert syn["speedup_goal_met"] == (syn["speedup"] >= 4.0)
    assert syn["rss_goal_met"] == (syn["rss_ratio"] <= 1.1)
    assert _positive(syn["batching_ceiling"]) and all(_positive(v) for v in syn["model_ms_per_image"].values())

    dis = res["distill"]
    assert all(
        _positive(v)
        for v in dis["throughput"]["streaming_samples_per_s"] + dis["throughput"]["in_memory_samples_per_s"]
    )
    assert _positive(dis["throughput"]["ratio_streaming_over_memory_median"])
    for mode in ("stream", "memory"):
        assert _positive(dis["peak_rss"][mode]["ratio_10x_over_1x_rss"])
        assert dis["peak_rss"][mode]["10x"]["samples"] == 10 * dis["peak_rss"][mode]["1x"]["samples"]
    lc = dis["label_cache"]
    assert lc["labelled_samples"] == 16 and _positive(lc["speedup_steady"]) and _positive(lc["speedup_wall"])

    dep = res["deploy"]
    arms = {"teacher", "restormer", "student", "student_ort_fp32", "student_ort_int8"}
    assert {r["arm"] for r in dep["rows"]} == arms and len(dep["rows"]) == len(arms)
    for r in dep["rows"]:
        assert _positive(r["median_ms"]) and _positive(r["total_mib"]) and r["model_mib"] <= r["total_mib"], r
    at = {r["arm"]: r for r in dep["rows"] if r["px"] == dep["ratios"]["px"]}
    ratio, goals = dep["ratios"], dep["goals"]
    ms, mib = {a: at[a]["median_ms"] for a in arms}, {a: at[a]["total_mib"] for a in arms}
    assert ratio["ort_fp32_speedup_vs_eager"] == pytest.approx(ms["student"] / ms["student_ort_fp32"], rel=0.01)
    assert ratio["speedup_vs_restormer_eager"] == pytest.approx(ms["restormer"] / ms["student"], rel=0.01)
    assert ratio["memory_ratio_vs_restormer_eager"] == pytest.approx(mib["restormer"] / mib["student"], rel=0.01)
    exp = dep["export"]["student"]
    assert (
        exp["max_abs_diff"] <= 1e-4 and math.isfinite(exp["int8_psnr_db"]) and exp["int8_method"].startswith("static")
    )
    assert goals["ort_fp32_2x_faster_than_eager"] == (ratio["ort_fp32_speedup_vs_eager"] >= 2.0)
    assert goals["student_50x_faster_than_restormer"] == (ratio["speedup_vs_restormer_eager"] >= 50.0)
    assert goals["student_10x_less_memory_than_restormer"] == (ratio["memory_ratio_vs_restormer_eager"] >= 10.0)
    assert ratio["memory_ratio_vs_restormer_ort"] == pytest.approx(mib["restormer"] / mib["student_ort_fp32"], rel=0.01)
    assert goals["student_onnx_10x_less_memory_than_restormer"] == (ratio["memory_ratio_vs_restormer_ort"] >= 10.0)
    assert goals["int8_psnr_at_least_35db"] == (exp["int8_psnr_db"] >= 35.0)
    assert math.isfinite(dep["int8_psnr_db_photo"])


def test_run_all_rejects_unknown_names(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "synthesise"],
        capture_output=True, text=True, env=_env(), timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and "synthesise" in r.stderr and "synthesize" in r.stderr


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_gpu_benchmark_builds_sd15_sizes_and_runs_on_cpu(tmp_path: Path) -> None:
    """The one-command GPU benchmark, in its CPU smoke form: SD 1.5-sized models, one tiny batch."""
    out = tmp_path / "gpu.json"
    args = ["--allow-cpu", "--resolution", "64", "--steps", "2", "--batches", "1", "--dtype", "float32",
            "--repeats", "1", "--warmup", "0", "--tokens", "8", "--json", str(out)]  # fmt: skip
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_synthesis.py"), *args],
        capture_output=True, text=True, env=_env(), timeout=600, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    m = re.search(r"UNet (\d+) M parameters", r.stdout)
    assert m and int(m.group(1)) == 860, r.stdout  # SD 1.5's UNet size, built from its config
    res = json.loads(out.read_text())
    assert res["resolution"] == 64 and res["steps"] == 2
    backends = {row["backend"] for row in res["rows"]}
    assert "sdpa" in backends
    sdpa = next(row for row in res["rows"] if row["backend"] == "sdpa")
    assert sdpa["batch"] == 1 and sdpa["dropped"] == 0 and sdpa["unet_calls"] == 1
    assert _positive(sdpa["images_per_s"]) and _positive(sdpa["unet_gflop_per_call"])
