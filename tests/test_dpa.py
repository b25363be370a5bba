"""DPA: the demo bars (held-out weather accuracy, content invariance), exact resume after
SIGKILL, bad-input errors before training, the CLIP encoder path, and the losses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.data.manifests import load_manifest, open_rgb, write_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.losses import prototype_loss, supcon_loss, text_anchor_loss
from d4ir_pipeline.stage1.dpa.model import dpa_embedding, encode_images, load_dpa, prepare_image
from d4ir_pipeline.stage1.dpa.train import DPAConfig, DPADataError, train_dpa

REPO = Path(__file__).resolve().parent.parent


def _work(root: Path, demo_data_root: Path, tiny_sd_path: Path) -> Path:
    """A run work dir whose data/ and tiny-sd/ are the session fixtures (so `{work}` paths resolve)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").symlink_to(demo_data_root, target_is_directory=True)
    (root / "tiny-sd").symlink_to(tiny_sd_path, target_is_directory=True)
    return root


def _cfg(profile: str, work: Path, *overrides: str) -> DPAConfig:
    return load_stage_config(DPAConfig, "dpa", profile=profile, overrides=list(overrides), work_dir=str(work))


def _subset(demo_data_root: Path, dest: Path, *, per_weather: int = 4, weathers=("rain", "haze", "snow"),
            unlabel: bool = False) -> Path:  # fmt: skip
    """Copy a few web-degraded images to ``dest`` with their manifest; returns the manifest path."""
    recs = load_manifest(demo_data_root / "manifests" / "web-degraded.jsonl")
    chosen = []
    for w in weathers:
        chosen += [r for r in recs if r.weather == w][:per_weather]
    for r in chosen:
        (dest / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_data_root / r.path, dest / r.path)
    if unlabel:
        chosen = [dataclasses.replace(r, weather=None) for r in chosen]
    return write_manifest(dest / "manifests" / "web-degraded.jsonl", chosen)


def _small(work: Path, manifest: Path, root: Path, *extra: str) -> DPAConfig:
    """The smoke profile on a small subset, no report: a couple of seconds."""
    return _cfg("smoke", work, f"data.manifest={json.dumps(str(manifest))}", f"data.root={json.dumps(str(root))}",
                "report.enabled=false", "train.steps=2", "train.grad_accum=1", *extra)  # fmt: skip


# --------------------------------------------------------------------------- demo bars


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_data_root, tiny_sd_path):
    """The demo config, CPU, seed 0, trained once for the module (about a minute on one core)."""
    work = _work(tmp_path_factory.mktemp("dpa-demo") / "w", demo_data_root, tiny_sd_path)
    cfg = _cfg("demo", work, "runtime.device=cpu")
    return cfg, train_dpa(cfg)  # one torch thread (conftest): the bar's setting ("one core")


@pytest.mark.slow
def test_demo_held_out_weather_accuracy(demo_run):
    _, res = demo_run
    rep = res.report
    assert rep["n_test"] == 60 and rep["test_left_out_source_overlap"] == 0
    assert rep["held_out_weather_accuracy"] >= 0.90, rep


@pytest.mark.slow
def test_demo_content_invariance(demo_run):
    rep = demo_run[1].report
    assert rep["pairs"]["diff_weather_same_photo"] > 0 and rep["pairs"]["same_weather_diff_photo"] > 0
    assert rep["same_weather_diff_photo_cos"] > rep["diff_weather_same_photo_cos"], rep


@pytest.mark.slow
def test_demo_outputs_and_rerun(demo_run, demo_data_root):
    cfg, res = demo_run
    out = Path(cfg.output.dir)
    meta = json.loads((out / "dpa.json").read_text())
    assert meta["complete"] and meta["step"] == cfg.train.steps and meta["spec"]["adapter"]["dim"] == 32
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(res.report))
    assert (out / "embeddings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(cfg.log.every, cfg.train.steps + 1, cfg.log.every))
    assert all(k in rows[-1] for k in ("contrastive", "prototype", "diffusion", "text_anchor", "images_per_s"))
    assert res.images_per_s and res.images_per_s > 0
    # the saved model gives (B, K, D) tokens; rerunning the command does not train again
    model, _ = load_dpa(out)
    rec = load_manifest(demo_data_root / "manifests" / "web-degraded.jsonl")[0]
    tok = encode_images(model, [prepare_image(open_rgb(demo_data_root, rec), cfg.data.load_size)], "cpu")
    assert tok.shape == (1, cfg.adapter.tokens, 32) and torch.isfinite(tok).all()
    again = train_dpa(cfg)
    assert again.already_done and again.report["held_out_weather_accuracy"] == res.report["held_out_weather_accuracy"]


# --------------------------------------------------------------------------- exact resume


def _cli(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "d4ir_pipeline.cli", "train-dpa", "--profile", "smoke", "--work-dir", str(work),
            "--set", "report.enabled=false", *extra]  # fmt: skip


@pytest.mark.slow  # a subprocess run (fresh interpreters import torch)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, demo_data_root, tiny_sd_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "D4IR_STAGES": str(REPO / "stages"), "PYTHONPATH": str(REPO)}  # fmt: skip
    killed = _work(tmp_path / "killed", demo_data_root, tiny_sd_path)
    clean = _work(tmp_path / "clean", demo_data_root, tiny_sd_path)
    pointer = killed / "dpa" / "checkpoints" / "latest.json"

    # 1. start, wait for the first checkpoint, SIGKILL
    proc = subprocess.Popen(_cli(killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not pointer.exists():
        assert proc.poll() is None, (
            f"training exited before its first checkpoint: {proc.stderr.read().decode()[-2000:]}"
        )
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "dpa" / "dpa.json").exists(), "the run finished before it could be killed"
    first = json.loads(pointer.read_text())["step"]
    assert first < 12

    # 2. rerun the same command: it resumes; 3. an uninterrupted run with the same seed and config, in this
    # process (one torch thread, as the subprocesses: conftest pins it) to spare a third interpreter start
    resumed = subprocess.run(_cli(killed), env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming DPA training from step" in resumed.stderr
    assert torch.get_num_threads() == 1
    train_dpa(_cfg("smoke", clean, "report.enabled=false"))

    a = load_file(str(killed / "dpa" / "dpa.safetensors"))
    b = load_file(str(clean / "dpa" / "dpa.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    start = json.loads((clean / "dpa" / "dpa.json").read_text())
    assert start["complete"] and start["step"] == 12
    # metrics rows are not duplicated by the resume
    steps = [json.loads(x)["step"] for x in (killed / "dpa" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_resume_refuses_a_different_training_config(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub")
    train_dpa(_small(work, manifest, tmp_path / "sub", "loss.diffusion=0"))
    with pytest.raises(D4IRError, match="different training config.*train.lr"):
        train_dpa(_small(work, manifest, tmp_path / "sub", "loss.diffusion=0", "train.lr=0.5"))


# --------------------------------------------------------------------------- bad input


def test_no_degraded_images_is_an_error_before_training(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    clean = load_manifest(demo_data_root / "manifests" / "web-clean.jsonl")[:5]
    manifest = write_manifest(tmp_path / "clean.jsonl", clean)
    with pytest.raises(DPADataError, match="no degraded images"):
        train_dpa(_small(work, manifest, demo_data_root))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DPADataError, match="no degraded images"):
        train_dpa(_small(work, empty, demo_data_root))
    assert not (work / "dpa").exists()


def test_one_weather_with_labels_required_is_an_error(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub", weathers=("rain",))
    with pytest.raises(DPADataError, match=r"only one weather \(\['rain'\]\).*require_labels"):
        train_dpa(_small(work, manifest, tmp_path / "sub"))
    assert not (work / "dpa").exists()


def test_missing_labels_or_files_are_errors_before_training(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    sub = tmp_path / "sub"
    manifest = _subset(demo_data_root, sub, unlabel=True)
    with pytest.raises(DPADataError, match="without a weather label"):
        train_dpa(_small(work, manifest, sub))
    manifest = _subset(demo_data_root, sub)
    victim = load_manifest(manifest)[3]
    (sub / victim.path).unlink()
    with pytest.raises(DPADataError, match=rf"1 of 12 image file\(s\) missing.*{victim.id}"):
        train_dpa(_small(work, manifest, sub))
    assert not (work / "dpa").exists()


def test_unlabelled_images_train_instance_level(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub", unlabel=True)
    res = train_dpa(_small(work, manifest, tmp_path / "sub", "data.require_labels=false", "loss.text_anchor=0"))
    assert res.weathers == [] and res.steps == 2
    row = json.loads((work / "dpa" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["contrastive"] > 0 and "prototype" not in row


def test_unreadable_images_are_skipped_and_counted(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    sub = tmp_path / "sub"
    manifest = _subset(demo_data_root, sub)
    bad = load_manifest(manifest)[0]
    (sub / bad.path).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    res = train_dpa(_small(work, manifest, sub, "loss.diffusion=0"))
    assert sum(res.skipped.values()) == 1 and res.num_images == 11
    assert json.loads((work / "dpa" / "dpa.json").read_text())["skipped"] == res.skipped


# --------------------------------------------------------------------------- CLIP encoder


def test_clip_encoder_from_a_saved_folder_trains_only_what_is_unfrozen(tmp_path, demo_data_root, tiny_sd_path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    clip_dir = tmp_path / "tiny-clip"
    CLIPVisionModelWithProjection(config).save_pretrained(clip_dir)
    original = CLIPVisionModelWithProjection.from_pretrained(clip_dir).state_dict()

    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub")
    res = train_dpa(_small(work, manifest, tmp_path / "sub", "encoder.kind=clip",
                           f"encoder.clip_model={json.dumps(str(clip_dir))}", "encoder.unfreeze_last=1",
                           "encoder.image_size=0", "loss.diffusion_batch=2"))  # fmt: skip
    saved = load_file(str(res.weights))
    enc_keys = {k.removeprefix("encoder.clip.") for k in saved if k.startswith("encoder.")}
    assert enc_keys and all(k.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.",
                                          "visual_projection.")) for k in enc_keys), enc_keys  # fmt: skip
    assert any(k.startswith("adapter.") for k in saved)
    model, meta = load_dpa(work / "dpa")
    assert meta["spec"]["encoder"] == {"kind": "clip", "model": str(clip_dir), "projection": True,
                                       "unfreeze_last": 1, "image_size": 32}  # fmt: skip
    state = model.encoder.clip.state_dict()
    # the frozen block is the pre-trained one; the unfrozen block moved
    assert torch.equal(state["vision_model.encoder.layers.0.mlp.fc1.weight"],
                       original["vision_model.encoder.layers.0.mlp.fc1.weight"])  # fmt: skip
    assert not torch.equal(state["vision_model.encoder.layers.1.mlp.fc1.weight"],
                           original["vision_model.encoder.layers.1.mlp.fc1.weight"])  # fmt: skip
    x = torch.rand(2, 3, 40, 40)
    assert model(x).shape == (2, 4, 32)


def test_clip_encoder_bad_source_is_a_clear_error(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub")
    with pytest.raises(D4IRError, match="encoder.clip_model"):
        train_dpa(_small(work, manifest, tmp_path / "sub", "encoder.kind=clip",
                         f"encoder.clip_model={json.dumps(str(tmp_path / 'nope'))}"))  # fmt: skip


# --------------------------------------------------------------------------- losses


def test_supcon_prefers_weather_clusters_over_content_clusters():
    torch.manual_seed(0)
    weather = torch.tensor([0, 0, 1, 1, 2, 2])
    by_weather = torch.nn.functional.normalize(torch.eye(3)[weather] + 0.01 * torch.randn(6, 3), dim=-1)
    by_content = torch.nn.functional.normalize(torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])], dim=-1)
    assert supcon_loss(by_weather, weather, 0.1) < supcon_loss(by_content, weather, 0.1) - 1.0
    # instance labels only (unlabelled): a positive pair per instance, InfoNCE
    inst = torch.tensor([0, 1, 2, 0, 1, 2])
    assert supcon_loss(by_content, inst, 0.1) < 1e-3
    # no positive anywhere: zero, with a gradient path
    z = by_weather.clone().requires_grad_()
    loss = supcon_loss(z, torch.arange(6), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None


def test_prototype_and_text_anchor_losses():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    good = prototype_loss(z, torch.tensor([0, 1, -1]), protos, 0.1)
    bad = prototype_loss(z, torch.tensor([1, 0, -1]), protos, 0.1)
    assert good < 0.01 < bad
    assert float(prototype_loss(z, torch.tensor([-1, -1, -1]), protos, 0.1)) == 0.0
    tokens = torch.zeros(4, 2, 3)
    tokens[:2, :, 0] = 1.0
    tokens[2:, :, 1] = 1.0
    labels = torch.tensor([0, 0, 1, 1])
    anchors = {0: torch.tensor([2.0, 0.0, 0.0]), 1: torch.tensor([0.0, 1.0, 0.0])}
    assert float(text_anchor_loss(tokens, labels, anchors)) == pytest.approx(0.0, abs=1e-6)
    assert float(text_anchor_loss(tokens, labels, {0: anchors[1]})) == pytest.approx(1.0)
    assert dpa_embedding(tokens).shape == (4, 6)


def test_missing_test_manifest_is_an_error_before_training(tmp_path, demo_data_root, tiny_sd_path):
    work = _work(tmp_path / "w", demo_data_root, tiny_sd_path)
    manifest = _subset(demo_data_root, tmp_path / "sub")
    cfg = _small(work, manifest, tmp_path / "sub", "report.enabled=true",
                 f"report.test_manifests=[{json.dumps(str(tmp_path / 'none.jsonl'))}]")  # fmt: skip
    with pytest.raises(D4IRError, match="report.test_manifests.*none.jsonl"):
        train_dpa(cfg)
    assert not (work / "dpa").exists()
