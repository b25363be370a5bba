"""`d4ir compare`: every row on tiny budgets, skipped rows with reasons, and the cache (a rerun redoes nothing)."""

from __future__ import annotations

import dataclasses
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
[output]
dir = "{{work}}/distill"
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


def test_format_table_lists_rows_and_skips():
    header = {
        "teacher": {"spec": {"name": "t"}, "path": "/t", "note": "n", "weights_sha256": "ab" * 32, "params": 2_000_000},
        "student": {"spec": {"name": "s", "kwargs": {"width": 8}}, "params": 20_000, "ratio": 0.01},
        "sd": {"id": "tiny", "note": "TINY RANDOM SD"},
        "budget": {"steps": 5, "batch": 2, "patch": 16, "seeds": [0]},
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


@pytest.mark.slow  # subprocess runs (fresh interpreters import torch and diffusers: ~8 s each)
def test_smoke_cli_end_to_end_then_two_seeds_then_a_third_trains_only_it(tmp_path):
    """`d4ir compare --profile smoke --quick` in subprocesses, all in one work dir (so the later runs reuse the
    data, the tiny SD, the prompt bank and seed 0 of the rows the first run trained):

    1. every row, seed 0: every row finite, JSON and both figures; a rerun prints the same table;
    2. the learned rows with `--seeds 0,1`: mean ± std for each; 3. `--seeds 0,1,2`: only seed 2 trains.
    """
    import subprocess
    import sys

    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    base = [sys.executable, "-m", "d4ir_pipeline.cli", "compare", "--profile", "smoke", "--quick"]
    cmd = [*base, "--work-dir", str(work)]
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

    # 2. two seeds of the learned rows (and the unsupervised ones)
    cmd = [*cmd, "--set", 'rows=["data_kd", "d4ir", "noise", "dfmc", "unpaired", "prior"]']
    out = subprocess.run([*cmd, "--seeds", "0,1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((work / "compare" / "table.json").read_text())
    learned = [r for r in doc["rows"] if r["row"] in ("data_kd", "d4ir", "noise", "dfmc", "unpaired")]
    assert len(learned) == 5 and all(r["status"] == "ok" and r["seeds"] == [0, 1] for r in learned), learned
    for r in learned:  # every learned row prints mean ± std for PSNR and SSIM in each weather and the average
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"| {r['title']} |"))
        assert line.count(" ± ") == 8, line
    assert "*unsupervised" in out.stdout and "seeds 0, 1" in out.stdout
    # 3. a third seed trains only that seed
    again = subprocess.run([*cmd, "--seeds", "0,1,2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.loads((work / "compare" / "table.json").read_text())
    for r in doc["rows"]:
        if r["row"] in ("data_kd", "d4ir", "noise", "dfmc", "unpaired"):
            cached = {s: run["cached"]["distill"] for s, run in r["per_seed"].items()}
            assert cached == {"0": True, "1": True, "2": False}, (r["row"], cached)


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


# ---------------------------------------------------------------------------------------
# seeds, the unsupervised rows, the spread marker


LEARNED = ("data_kd", "web", "noise", "dfmc", "unpaired")


def _seeded(env, demo_data_root, seeds):
    """The test config with two seeds, the unsupervised rows on the demo's web images, tiny CycleGAN nets."""
    import dataclasses

    m = demo_data_root / "manifests"
    return dataclasses.replace(
        env,
        rows=(*LEARNED, "prior"),
        budget=dataclasses.replace(env.budget, seeds=seeds),
        unpaired=dataclasses.replace(
            env.unpaired,
            clean_manifest=str(m / "web-clean.jsonl"),
            clean_root=str(demo_data_root),
            g_width=8,
            g_blocks=1,
            d_width=8,
            d_layers=2,
            pool_size=4,
        ),
        prior=dataclasses.replace(env.prior, patch=7, radius=8),
    )


def _record_seeds(monkeypatch) -> dict[str, list]:
    """Wrap compare's training and packing entry points: each call records the seed it trains with."""
    calls: dict[str, list] = {k: [] for k in ("distill", "dfmc", "unpaired", "noise", "pack")}
    real = {n: getattr(compare_mod, n) for n in ("distill", "train_dfmc", "train_unpaired", "write_noise_shards")}
    real["pack"] = compare_mod.pack_manifest_to_shards

    def distill(cfg, **kw):
        calls["distill"].append(cfg.train.seed)
        return real["distill"](cfg, **kw)

    def dfmc(*args, **kw):
        calls["dfmc"].append(args[5])  # train_dfmc(teacher, spec, steps, batch, patch, seed, out, ...)
        return real["train_dfmc"](*args, **kw)

    def unpaired(*args, **kw):
        calls["unpaired"].append(kw["config"].seed)
        return real["train_unpaired"](*args, **kw)

    def noise(*args, **kw):
        calls["noise"].append(kw["seed"])
        return real["write_noise_shards"](*args, **kw)

    def pack(*args, **kw):
        calls["pack"].append(args[0])
        return real["pack"](*args, **kw)

    for name, fn in (("distill", distill), ("train_dfmc", dfmc), ("train_unpaired", unpaired)):
        monkeypatch.setattr(compare_mod, name, fn)
    monkeypatch.setattr(compare_mod, "write_noise_shards", noise)
    monkeypatch.setattr(compare_mod, "pack_manifest_to_shards", pack)
    return calls


@pytest.mark.slow
def test_two_seeds_mean_std_unsupervised_rows_and_a_third_seed_trains_only_it(env, demo_data_root, monkeypatch):
    from d4ir_pipeline.shardset.reader import read_shard

    res = compare(_seeded(env, demo_data_root, (0, 1)))
    by = {r.row: r for r in res.rows}
    lines = {r.row: next(x for x in res.markdown.splitlines() if x.startswith(f"| {r.title} |")) for r in res.rows}
    for name in LEARNED:
        r = by[name]
        assert r.status == "ok", (name, r.reason)
        assert r.seeds == [0, 1] and set(r.per_seed) == {"0", "1"}
        # mean ± std of PSNR and SSIM in each weather and the average; std is the sample std of the two seeds
        assert lines[name].count(" ± ") == 2 * 4, lines[name]
        a, b = (r.per_seed[s]["metrics"]["rain"]["psnr_y"] for s in ("0", "1"))
        assert r.metrics["rain"]["psnr_y"] == pytest.approx((a + b) / 2)
        assert r.std["rain"]["psnr_y"] == pytest.approx(abs(a - b) / math.sqrt(2))
        assert a != b  # two seeds, two different students
        assert r.per_seed["0"]["student_dir"] != r.per_seed["1"]["student_dir"]
    assert by["unpaired"].group == by["prior"].group == "unsupervised"
    assert by["unpaired"].params == by["data_kd"].params  # the restorer has the student's architecture
    # the prior: haze only, "-" elsewhere and for the average; no seed, no spread
    assert set(by["prior"].metrics) == {"haze"} and by["prior"].seeds == []
    cells = [c.strip() for c in lines["prior"].strip("|").split("|")]
    assert cells[1] == "-" and cells[3] == "-" and cells[4] == "-" and " / " in cells[2] and "±" not in cells[2]
    assert " ± " not in lines["input"] and " ± " not in lines["teacher"]
    assert "*unsupervised" in res.markdown and "seeds 0, 1" in res.markdown
    doc = json.loads(res.table_json.read_text())
    assert {r["row"]: r["group"] for r in doc["rows"]}["unpaired"] == "unsupervised"
    assert set(doc["rows"][2]["per_seed"]) == {"0", "1"}
    # a limited pack budget spreads over the sorted manifest: every weather is in the web and data-KD sets
    for name in ("web", "data_kd"):
        listing = json.loads((Path(by[name].shards) / "shardset.json").read_text())
        metas = [
            json.loads(f["json"])
            for s in listing["shards"]
            for f in read_shard(Path(by[name].shards) / s["name"]).values()
        ]
        assert {m["weather"] for m in metas} == {"rain", "haze", "snow"}, name

    # one more seed: only seed 2 trains; the shard sets of data KD and web are reused
    calls = _record_seeds(monkeypatch)
    again = compare(_seeded(env, demo_data_root, (0, 1, 2)))
    assert calls == {"distill": [2, 2, 2], "dfmc": [2], "unpaired": [2], "noise": [2], "pack": []}
    for r in again.rows:
        if r.row in LEARNED:
            assert r.seeds == [0, 1, 2]
            assert (
                all(r.per_seed[s]["cached"]["distill"] for s in ("0", "1")) and not r.per_seed["2"]["cached"]["distill"]
            )
            assert r.per_seed["0"]["metrics"] == by[r.row].per_seed["0"]["metrics"]
        else:
            assert all(r.cached.values())


def test_seeds_must_be_distinct(env):
    with pytest.raises(compare_mod.D4IRError, match="distinct seeds"):
        compare(env, seeds=(1, 1))


def test_runtime_threads_hold_for_the_call_only(env):
    before = torch.get_num_threads()
    two = dataclasses.replace(env, runtime=dataclasses.replace(env.runtime, threads=before + 1))
    with pytest.raises(compare_mod.D4IRError, match="distinct seeds"):  # fails after the threads are set
        compare(two, seeds=(1, 1))
    assert torch.get_num_threads() == before  # the Python API leaves the caller's setting as it was


def test_the_old_single_seed_key_names_its_new_list_form():
    from d4ir_pipeline.config import ConfigError, load_stage_config

    with pytest.raises(ConfigError, match=r"`budget\.seed` was renamed; did you mean `budget\.seeds`"):
        load_stage_config(CompareConfig, "compare", profile="smoke", overrides=["budget.seed=1"])


def test_seeds_option_is_checked():
    from click.testing import CliRunner

    out = CliRunner().invoke(compare_mod.compare_command, ["--seeds", "0,x"])
    assert out.exit_code == 2 and "comma-separated integers" in out.output


def _row(name: str, per_seed: dict[int, tuple[float, float]]) -> RowResult:
    """A row whose rain PSNR per seed is the first value and haze PSNR the second."""
    from d4ir_pipeline.paper.table import aggregate, average

    r = RowResult(name, name.upper(), "ok")
    for seed, (rain, haze) in per_seed.items():
        m = {"rain": {"psnr_y": rain, "ssim_y": 0.5}, "haze": {"psnr_y": haze, "ssim_y": 0.5}}
        r.per_seed[str(seed)] = {"metrics": m, "average": average(m)}
    aggregate(r)
    return r


def test_marker_where_d4ir_is_within_the_combined_std():
    from d4ir_pipeline.paper.table import MARK, unresolved

    header = {
        "teacher": {"spec": {"name": "t"}, "path": "/t", "note": "n", "weights_sha256": "ab" * 32, "params": 10},
        "student": {"spec": {"name": "s", "kwargs": {}}, "params": 5, "ratio": 0.5},
        "sd": {"id": "x", "note": "toy"},
        "budget": {"steps": 5, "batch": 2, "patch": 16, "seeds": [0, 1]},
        "quick": False,
        "y_channel": True,
        "test_images": {"rain": 1, "haze": 1},
    }
    d4 = _row("d4ir", {0: (20.0, 15.0), 1: (22.0, 15.2)})  # rain 21 ± 1.41, haze 15.1 ± 0.14
    near = _row("web", {0: (20.5, 18.0), 1: (21.5, 18.2)})  # rain within the spread, haze 3 dB away
    marks = unresolved([d4, near], ("psnr_y", "ssim_y"))
    assert marks["web"] == {"rain": ["psnr_y"]}  # SSIM: equal means, no spread -> resolved; haze: 3 dB apart
    text = format_table(header, [d4, near], ["rain", "haze"])
    web = next(x for x in text.splitlines() if x.startswith("| WEB |"))
    assert f"21.00 ± 0.71{MARK}" in web and f"18.10 ± 0.14{MARK}" not in web and "18.10 ± 0.14" in web
    assert "combined std" in text
    # one seed of D4IR: no spread, no marker
    single = _row("d4ir", {0: (20.0, 15.0)})
    assert unresolved([single, near], ("psnr_y",)) == {}
    assert MARK not in format_table({**header, "budget": {**header["budget"], "seeds": [0]}}, [single, near], ["rain"])


def test_teacher_by_weather_scores_each_test_set_with_its_weathers_teacher(env, tmp_path):
    import dataclasses

    torch.manual_seed(3)
    rain_teacher = save_model(build_model("unet_s", base=8, depth=1), tmp_path / "rain-teacher")
    base = Path(env.stages.distill).read_text(encoding="utf-8")
    tomls = {
        "both": base.replace("[student]", f'[teacher.by_weather.rain]\ncheckpoint = "{rain_teacher}"\n[student]'),
        "rain": base.replace(str(tmp_path / "teacher"), str(rain_teacher)),
        "default": base,
    }
    runs = {}
    for name, text in tomls.items():
        stages = dataclasses.replace(env.stages, distill=str(_write(tmp_path / f"distill-{name}.toml", text)))
        out = dataclasses.replace(env.output, dir=str(tmp_path / f"compare-{name}"))
        runs[name] = {
            r.row: r for r in compare(dataclasses.replace(env, rows=("dfmc",), stages=stages, output=out)).rows
        }
    both, rain, default = (runs[k]["teacher"].metrics for k in ("both", "rain", "default"))
    assert both["rain"] == rain["rain"] and both["haze"] == default["haze"] and both["snow"] == default["snow"]
    assert rain["rain"] != default["rain"]  # the two teachers really differ
    assert runs["both"]["teacher"].params == runs["rain"]["teacher"].params + runs["default"]["teacher"].params
    dfmc = runs["both"]["dfmc"]
    assert dfmc.status == "skipped" and "by_weather" in dfmc.reason
