"""The SD 1.5-shaped folder: real CLIP tokenizer (checked against openai-clip), published sizes,
and the `sd15` stage configs resolving against the folder."""

from __future__ import annotations

import html
import json
import sys
import types

import pytest

from d4ir_pipeline.demo.sd15_shaped import (
    PUBLISHED_PARAMETERS,
    SD15ShapedError,
    build_sd15_modules,
    clip_vocab_and_merges,
    write_clip_tokenizer,
    write_sd15_shaped,
)

# weather captions, punctuation, casing, numbers, unicode that NFC leaves as ftfy does,
# whitespace, specials, and texts longer than the 77-token context
PHRASES = [
    "a photo taken in heavy rain",
    "a hazy photo, thick fog",
    "a photo taken in falling snow",
    "rain streaks over a city street at night",
    "Dense HAZE over the mountains; low visibility.",
    "snowflakes!!! falling... on a car?",
    "light drizzle, wet asphalt, reflections",
    "fog (very thick) and mist [morning]",
    "it's raining, don't forget the umbrella; we'll wait",
    "heavy-rain + strong-wind = storm",
    "temperature -3.5°C, 80% humidity",
    "1234567890 2024-01-31 12:30",
    "e-mail: someone@example.com #weather @home",
    "UPPER lower MiXeD CaSe",
    "café naïve résumé à la carte",
    "Straße in München bei Schnee",
    "日本語のテキスト、雨が降っている",
    "雪の日の東京",
    "Дождь и туман над рекой",
    "Ομίχλη και βροχή",
    "مطر غزير",
    "emoji 🌧️ ☔ ❄️ 🌫️",
    "e\u0301 combining accent",
    "tab\tseparated\nand new lines",
    "   leading and trailing spaces   ",
    "",
    "<|endoftext|> inside the text",
    "~`!@#$%^&*()_+-={}|[]\\:\";'<>?,./",
    "rain " * 100,
    "a" * 300,
    "hello world " * 40,
    "a snowy, snowy, snowy, snowy landscape " * 12,
]
# texts that openai-clip first cleans with ftfy.fix_text + html.unescape, which transformers'
# CLIPTokenizer (NFC + whitespace + lowercase) does not: fullwidth forms, ligatures, mojibake,
# HTML entities, curly quotes
CLEANED_BY_FTFY = [
    "Ｆｕｌｌｗｉｄｔｈ rain",
    "ﬁne ﬂuffy snow",
    "cafÃ© in the rain",
    "rain &amp; fog &lt;3",
    "“quoted” rain’s",
]


@pytest.fixture(scope="module")
def clip_tokenize():
    """openai-clip's own ``clip.tokenize`` (the oracle). Its package imports ``pkg_resources``
    only for ``pkg_resources.packaging``, which setuptools >= 81 no longer ships: provide that
    one attribute (the real ``packaging``) if it is missing."""
    pytest.importorskip("ftfy")
    with pytest.MonkeyPatch.context() as mp:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            import packaging.version

            mp.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(packaging=packaging))
        clip = pytest.importorskip("clip")
        yield clip.tokenize


@pytest.fixture(scope="module")
def sd15_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    path = write_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    return CLIPTokenizer.from_pretrained(str(path))  # what diffusers' loader calls


def _length(clip_ids: list[int]) -> int:
    """Tokens before clip.tokenize's zero padding (id 0, '!', never ends a sequence: EOT does)."""
    n = len(clip_ids)
    while n and clip_ids[n - 1] == 0:
        n -= 1
    return n


def test_vocabulary_is_clips():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(merges) == 48894
    assert vocab["rain</w>"] == vocab["".join(merges[vocab["rain</w>"] - 512])]


def test_tokenizer_ids_equal_clip_tokenize(sd15_tokenizer, clip_tokenize):
    tok = sd15_tokenizer
    assert (len(tok), tok.model_max_length) == (49408, 77)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert len(PHRASES) >= 30
    for text in PHRASES:
        want = clip_tokenize(text, truncate=True)[0].tolist()  # (77,), zero-padded
        got = tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert len(got) == 77, text
        n = _length(want)
        assert want[n - 1] == 49407, text
        assert got[:n] == want[:n], f"{text!r}: {got[:12]} vs {want[:12]}"
        assert set(got[n:]) <= {49407}, text  # clip pads with 0, SD 1.5's tokenizer with EOS
    long_ids = tok("rain " * 100, truncation=True, max_length=77)["input_ids"]
    assert len(long_ids) == 77 and long_ids[-1] == 49407


def test_ftfy_cleaned_text_is_the_only_difference(sd15_tokenizer, clip_tokenize):
    """Where the ids differ, it is openai-clip's text cleaning (not the vocabulary): the HF
    tokenizer on the cleaned text gives clip.tokenize's ids."""
    import ftfy

    for text in CLEANED_BY_FTFY:
        want = clip_tokenize(text, truncate=True)[0].tolist()
        want = want[: _length(want)]
        raw = sd15_tokenizer(text)["input_ids"]
        cleaned = sd15_tokenizer(html.unescape(html.unescape(ftfy.fix_text(text))).strip())["input_ids"]
        assert raw != want, f"{text!r} is not an example of the difference"
        assert cleaned == want, text


def test_published_parameter_counts_on_meta():
    modules = build_sd15_modules("meta")
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in modules.items()}
    for name, published in PUBLISHED_PARAMETERS.items():
        assert round(counts[name], 1) == published, (name, counts[name])
    assert all(p.is_meta for m in modules.values() for p in m.parameters())


def test_unknown_module_name():
    with pytest.raises(ValueError, match="expected some of"):
        build_sd15_modules("meta", ("unet", "decoder"))


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory):
    """The real command's folder without weights (configs, tokenizer, index): seconds, not 2.7 GB."""
    return write_sd15_shaped(tmp_path_factory.mktemp("sd15") / "sd15", weights=False)


def test_skeleton_layout_and_configs_rebuild_published_sizes(skeleton):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    index = json.loads((skeleton / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor"):
        assert (skeleton / part).is_dir() and part in index, part
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    with torch.device("meta"):  # what from_pretrained will build from these files
        built = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skeleton / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(skeleton / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(skeleton / "text_encoder")),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig.from_pretrained(skeleton / "image_encoder")
            ),
        }
    for name, m in built.items():
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == PUBLISHED_PARAMETERS[name], name


def test_existing_foreign_folder_is_not_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SD15ShapedError, match="refusing"):
        write_sd15_shaped(tmp_path / "mine", weights=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------ fixes found at real size
def test_clip_encoder_trains_float32_from_a_float16_folder(tmp_path):
    """The sd15-shaped tower is stored in float16; transformers 5 loaded it as float16, so unfrozen
    blocks trained in half precision (and a float16 GradScaler refuses their gradients)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from d4ir_pipeline.stage1.dpa.model import CLIPEncoder

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).half().save_pretrained(tmp_path / "clip16")
    enc = CLIPEncoder(str(tmp_path / "clip16"), unfreeze_last=1)
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert enc.clip.dtype == torch.float32
    feat = enc(torch.rand(2, 3, 40, 40))
    feat.sum().backward()
    assert feat.shape == (2, 16) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


# ------------------------------------------------------------------ the smoke driver's fast pieces
def _settings(tmp_path, sd_folder):
    from d4ir_pipeline.demo.smoke_sd15 import SmokeSettings

    work = tmp_path / "work"
    work.mkdir()
    (work / "sd15").symlink_to(sd_folder, target_is_directory=True)
    return SmokeSettings(work=str(work))


def test_sd15_stage_configs_resolve_against_the_folder(tmp_path, skeleton):
    """Every `sd15` stage config, with the smoke's overrides, loads and matches the folder (no network)."""
    from d4ir_pipeline.demo.smoke_sd15 import resolve_configs, stage_commands, stage_overrides

    s = _settings(tmp_path, skeleton)
    got = resolve_configs(s)
    assert (got["prompt_width"], got["resolution"], got["latent"]) == (768, 512, 64)
    assert (got["context"], got["vocab"], got["clip_image_size"], got["clip_feature"]) == (77, 49408, 224, 768)
    assert got["scheduler"] == "DDIMScheduler" and got["student"] == "nafnet_s"
    over = stage_overrides(s)
    for name, argv in stage_commands(s):
        assert argv[1:4] == ["-m", "d4ir_pipeline.cli", argv[3]] and argv[4:8] == ["--profile", "sd15", "--work-dir",
                                                                                    s.work]  # fmt: skip
        assert argv[9::2] == over[argv[3]], name  # every override reaches the command line


def test_smoke_deploy_steps_are_real_cli_invocations(tmp_path, skeleton):
    """export and restore run the real commands: each argv parses against the click command itself
    (an unknown or renamed option fails here), on the distilled student and its exported ONNX model."""
    from d4ir_pipeline.cli import main as d4ir
    from d4ir_pipeline.config import load_stage_config
    from d4ir_pipeline.demo.smoke_sd15 import deploy_commands, stage_overrides
    from d4ir_pipeline.stage2.config import DistillConfig, student_dir

    s = _settings(tmp_path, skeleton)
    dcfg = load_stage_config(DistillConfig, "distill", profile="sd15", overrides=tuple(stage_overrides(s)["distill"]),
                             work_dir=s.work)  # fmt: skip
    steps = dict(deploy_commands(s))
    assert list(steps) == ["export", "restore"]
    for name, argv in steps.items():
        assert argv[1:4] == ["-m", "d4ir_pipeline.cli", name]
        cmd = d4ir.get_command(None, name)
        ctx = cmd.make_context(name, argv[4:], resilient_parsing=False)
        if name == "export":
            assert ctx.params["checkpoint"] == str(student_dir(dcfg.output.dir, dcfg.student))  # where distill writes
            assert ctx.params["out"] == str(s.root / "export") and ctx.params["overwrite"]
        else:
            assert ctx.params["checkpoint"] == str(s.root / "export" / "model.onnx")
            assert ctx.params["input_path"].endswith("test.jsonl") and ctx.params["device"] == "cpu"
    cuda = deploy_commands(type(s)(work=s.work, device="cuda"))[1][1]
    assert cuda[cuda.index("--device") + 1] == "auto"  # ONNX Runtime picks its CUDA provider when it has one


def test_resolve_refuses_a_unet_of_another_native_size(tmp_path, skeleton):
    """SD 1.5's Flax unet/config.json says sample_size 32: a 256 px UNet for the 512 px profile."""
    import shutil

    from d4ir_pipeline.demo.smoke_sd15 import resolve_configs
    from d4ir_pipeline.errors import D4IRError

    bad = tmp_path / "bad-sd"
    shutil.copytree(skeleton, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 32}))
    with pytest.raises(D4IRError, match="native resolution is 256"):
        resolve_configs(_settings(tmp_path, bad))


def test_child_rusage_is_per_child(tmp_path):
    """Peak RSS is each child's own (os.wait4), not the maximum over all children so far, and the
    driver stays small: on Linux a child's ru_maxrss starts at its parent's resident size."""
    import subprocess

    driver = f"""
import json, sys
from d4ir_pipeline.demo.smoke_sd15 import run_child
assert "torch" not in sys.modules, "the driver must not import torch"
big = run_child("big", [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                {str(tmp_path)!r})
small = run_child("small", [sys.executable, "-c", "print('attention backend: PyTorch SDPA')"], {str(tmp_path)!r})
fails = run_child("fails", [sys.executable, "-c", "raise SystemExit(3)"], {str(tmp_path)!r})
print(json.dumps([big.__dict__, small.__dict__, fails.__dict__]))
"""
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    big, small, fails = json.loads(r.stdout.splitlines()[-1])
    assert big["returncode"] == 0 and small["returncode"] == 0 and fails["returncode"] == 3
    assert big["peak_rss_mib"] >= 300 > 100 > small["peak_rss_mib"]
    assert small["attention"] == ["PyTorch SDPA"]
    assert (tmp_path / "small.log").read_text().strip() == "attention backend: PyTorch SDPA"


def test_smoke_data_are_upscaled_and_laid_out_for_manifest_build(tmp_path, demo_data_root):
    from d4ir_pipeline.data.manifests import build_manifest, load_manifest
    from d4ir_pipeline.demo.smoke_sd15 import SmokeSettings, prepare_data

    s = SmokeSettings(work=str(tmp_path / "w"), size=128)
    counts = prepare_data(s, demo_data_root)
    assert counts == {"web-degraded": 6, "web-clean": 2, "test": 3}
    data = tmp_path / "w" / "data"
    build_manifest(data / "web-degraded", out=tmp_path / "deg.jsonl", split="web-degraded", strict=True, progress=False)
    build_manifest(data / "test" / "rain", out=tmp_path / "rain.jsonl", split="test", strict=True, progress=False)
    deg = load_manifest(tmp_path / "deg.jsonl")
    assert sorted(r.weather for r in deg) == ["haze", "haze", "rain", "rain", "snow", "snow"]
    assert all(min(r.width, r.height) == 128 for r in deg)
    (rain,) = load_manifest(tmp_path / "rain.jsonl")
    assert rain.target is not None and (rain.width, rain.height) == (128, 128)


# ------------------------------------------------------------------ benchmarks/gpu_check.py (no GPU here)
def _bench_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("script", "message"), [("gpu_check", "needs a CUDA GPU"), ("gpu_deploy", "no CUDA device")])
def test_gpu_scripts_refuse_without_cuda(script, message, tmp_path, capsys, monkeypatch):
    import torch

    mod = _bench_script(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main(["--json", str(tmp_path / "g.json"), "--work-dir", str(tmp_path / "w")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists() and not (tmp_path / "w").exists()


def test_gpu_check_plan_and_arguments(tmp_path):
    gc = _bench_script("gpu_check")
    args = gc.parse_args(["--work-dir", str(tmp_path), "--distill-steps", "5"])
    steps = dict(gc.plan(args))
    assert list(steps) == ["smoke", "nccl-probe", "torchrun", "deploy", "bench"]
    assert steps["deploy"][1].endswith("gpu_deploy.py") and str(tmp_path / "gpu-deploy.json") in steps["deploy"]
    assert steps["smoke"][-6:] == ["--device", "cuda", "--dtype", "float16", "--attention", "auto"]
    run = steps["torchrun"]
    assert "--nproc_per_node=1" in run and run[run.index("d4ir_pipeline.cli") + 1 : run.index("d4ir_pipeline.cli") + 4] == [
        "distill", "--profile", "sd15"]  # fmt: skip
    assert "train.steps=5" in run and 'runtime.device="cuda"' in run
    assert sum(gc.LIMITS_S.values()) <= 8 * 60
    assert list(dict(gc.plan(gc.parse_args(["--skip", "bench", "torchrun", "deploy"])))) == ["smoke"]
    for bad in (["--bench-repeats", "0"], ["--skip", "nothing"]):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(bad)
        assert e.value.code == 2


@pytest.mark.slow
def test_gpu_deploy_runs_its_checks_on_the_cpu(tmp_path, monkeypatch):
    """The GPU deploy check's own code on the CPU (tiny sizes): restores, tiles, compares, exports."""
    import torch

    gd = _bench_script("gpu_deploy")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "d.json"
    argv = ["--allow-cpu", "--small", "--models", "nafnet_s", "--onnx", "always", "--work-dir", str(tmp_path / "w")]
    assert gd.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    row = doc["models"]["nafnet_s"]
    assert doc["failed"] == [] and doc["device"] == "cpu"
    assert row["auto"]["dtype"] == row["fp32"]["dtype"] == "float32"  # no half precision on the CPU
    assert row["auto"]["restored"] == 3 and row["auto"]["tiled"] == ["large.png"]
    assert set(row["auto_vs_fp32"]) == {"large.png", "odd.png", "square.png"}
    assert all(r["max_levels"] == 0 for r in row["auto_vs_fp32"].values())  # the same float32 run twice
    assert row["onnx"]["export_max_abs_diff"] <= 1e-4
    assert all(r["max_levels"] <= 1 for r in row["onnx"]["vs_pytorch_fp32"].values())

    # the checks can fail: a row whose large photo was not tiled and whose half run lost detail
    bad = json.loads(json.dumps(row))
    bad["auto"]["tiled"] = []
    bad["auto_vs_fp32"]["odd.png"]["psnr_db"] = 30.0
    failed = gd.check_model("nafnet_s", bad, ["large.png", "odd.png", "square.png"])
    assert any("not tiled" in f for f in failed) and any("below 35.0 dB" in f for f in failed)
