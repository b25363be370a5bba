"""Prompt bank: format (docs/ARCHITECTURE.md), atomic rebuild, skipping, and tokens that go
straight into StableDiffusionImg2ImgPipeline as prompt_embeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.data.manifests import load_manifest, write_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.train import DPAConfig, train_dpa
from d4ir_pipeline.stage1.prompt_bank import BankConfig, PromptBank, build_prompt_bank


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data_root, tiny_sd_path):
    """A smoke-profile DPA trained on the demo data (a few seconds), shared by the module."""
    work = tmp_path_factory.mktemp("bank") / "w"
    work.mkdir()
    (work / "data").symlink_to(demo_data_root, target_is_directory=True)
    (work / "tiny-sd").symlink_to(tiny_sd_path, target_is_directory=True)
    cfg = load_stage_config(DPAConfig, "dpa", profile="smoke", work_dir=str(work),
                            overrides=["report.enabled=false", "train.steps=3"])  # fmt: skip
    train_dpa(cfg)
    return work


def _bank_cfg(work: Path, *overrides: str) -> BankConfig:
    return load_stage_config(BankConfig, "prompt-bank", profile="smoke", work_dir=str(work), overrides=list(overrides))


def test_bank_format_and_load(trained, demo_data_root):
    res = build_prompt_bank(_bank_cfg(trained))
    out = trained / "bank"
    assert res.out_dir == out and not res.up_to_date
    assert sorted(p.name for p in out.iterdir()) == ["bank.json", "index.jsonl", "tokens.safetensors"]
    meta = json.loads((out / "bank.json").read_text())
    assert {"weathers", "K", "D", "adapter_sha256", "sd_model", "created"} <= set(meta)
    assert meta["weathers"] == ["haze", "rain", "snow"] and meta["K"] == 4 and meta["D"] == 32
    assert meta["adapter_sha256"] == sha256_file(trained / "dpa" / "dpa.safetensors")

    manifest = load_manifest(demo_data_root / "manifests" / "web-degraded.jsonl")
    bank = PromptBank.load(out)
    assert bank.tokens.dtype == torch.float32 and bank.tokens.shape == (len(manifest), 4, 32)
    assert bank.centroids.shape == (3, 4, 32)
    assert [r["row"] for r in bank.records] == list(range(len(manifest)))
    assert set(bank.records[0]) == {"row", "id", "sha256", "weather"}
    by_id = {r.id: r for r in manifest}
    assert all(by_id[r["id"]].sha256 == r["sha256"] and by_id[r["id"]].weather == r["weather"] for r in bank.records)
    rows = bank.rows_for("snow")
    assert len(rows) == 96 and all(bank.records[i]["weather"] == "snow" for i in rows)
    assert torch.allclose(bank.centroid("snow"), bank.tokens[rows].mean(0), atol=1e-6)
    with pytest.raises(KeyError, match="fog"):
        bank.rows_for("fog")

    # rerun: nothing changes
    again = build_prompt_bank(_bank_cfg(trained))
    assert again.up_to_date and again.num_rows == res.num_rows


def test_bank_tokens_drive_img2img_without_reshaping(trained, tiny_sd_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    from d4ir_pipeline.stage1.sd import load_img2img_pipeline, unconditional_embeds

    build_prompt_bank(_bank_cfg(trained))
    bank = PromptBank.load(trained / "bank")
    pipe = load_img2img_pipeline(str(tiny_sd_path), device="cpu", attention="sdpa")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    rows = [bank.rows_for("rain")[0], bank.rows_for("haze")[0]]
    prompt_embeds = bank.tokens[rows]  # (2, K, D), as stored
    negative = unconditional_embeds(pipe, bank.K, bank.D).expand(len(rows), -1, -1)
    images = pipe(
        image=torch.rand(2, 3, 64, 64),
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        strength=0.6,
        guidance_scale=4.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 64, 64, 3)
    # the centroid of a weather works the same way
    out = pipe(image=torch.rand(1, 3, 64, 64), prompt_embeds=bank.centroid("rain")[None],
               negative_prompt_embeds=negative[:1], strength=0.5, num_inference_steps=2,
               output_type="np").images  # fmt: skip
    assert out.shape == (1, 64, 64, 3)


def test_bank_skips_unreadable_images_and_rebuilds_atomically(trained, demo_data_root, tmp_path):
    import shutil

    recs = load_manifest(demo_data_root / "manifests" / "web-degraded.jsonl")[::40]
    root = tmp_path / "root"
    for r in recs:
        (root / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_data_root / r.path, root / r.path)
    (root / recs[1].path).write_bytes(b"not an image at all")
    manifest = write_manifest(tmp_path / "m.jsonl", recs)
    out = tmp_path / "bank"
    overrides = (f"bank.manifest={json.dumps(str(manifest))}", f"bank.root={json.dumps(str(root))}",
                 f"output.dir={json.dumps(str(out))}")  # fmt: skip
    res = build_prompt_bank(_bank_cfg(trained, *overrides))
    assert res.num_rows == len(recs) - 1 and sum(res.skipped.values()) == 1
    bank = PromptBank.load(out)
    assert recs[1].id not in {r["id"] for r in bank.records}
    assert json.loads((out / "bank.json").read_text())["skipped"] == res.skipped
    # a forced rebuild replaces the folder and leaves no staging folder behind
    build_prompt_bank(_bank_cfg(trained, *overrides, "bank.overwrite=true"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "m.jsonl", "root"]


def test_bank_errors(trained, tmp_path):
    with pytest.raises(D4IRError, match="no trained DPA"):
        build_prompt_bank(_bank_cfg(trained, f"bank.dpa_dir={json.dumps(str(tmp_path))}"))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(D4IRError, match="no degraded images"):
        build_prompt_bank(_bank_cfg(trained, f"bank.manifest={json.dumps(str(empty))}"))
    bad = tmp_path / "badbank"
    bad.mkdir()
    (bad / "bank.json").write_text(json.dumps({"kind": "d4ir-prompt-bank", "weathers": [], "K": 4, "D": 32}))
    with pytest.raises(D4IRError, match="tokens.safetensors is missing"):
        PromptBank.load(bad)


def test_prompt_bank_write_round_trips_and_computes_centroids(tmp_path):
    tokens = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)  # (N, K, D)
    rows = [
        {"id": f"img{i}", "sha256": f"{i:064x}", "weather": w, "text": "extra keys are kept"}
        for i, w in enumerate(["snow", "rain", "snow", None])
    ]
    bank = PromptBank.write(tmp_path / "bank", tokens, rows, meta={"adapter_sha256": None, "created": "test"})
    again = PromptBank.load(tmp_path / "bank")
    assert again.weathers == ["rain", "snow"] and again.K == 2 and again.D == 3 and len(again) == 4
    assert torch.equal(again.tokens, tokens)
    assert torch.equal(again.centroid("snow"), (tokens[0] + tokens[2]) / 2)
    assert torch.equal(again.centroid("rain"), tokens[1])
    assert again.rows_for(None) == [3] and again.records[0]["text"] == "extra keys are kept"
    assert bank.meta["num_rows"] == 4 and bank.meta["created"] == "test"
    with pytest.raises(D4IRError, match="3 rows for tokens"):
        PromptBank.write(tmp_path / "bank", tokens, rows[:3], meta={})
    assert len(PromptBank.load(tmp_path / "bank")) == 4  # a refused write leaves the bank as it was
