"""The SD loader: tiny random SD through the real from_pretrained path, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from d4ir_pipeline.stage1.sd import (
    SDLoadError,
    check_sd_source,
    load_img2img_pipeline,
    set_attention_backend,
    text_hidden_size,
    unconditional_embeds,
)


def test_tiny_sd_layout_and_width(tiny_sd_path):
    index = json.loads((tiny_sd_path / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_path / part).is_dir(), part
        assert part in index
    assert "meaningless" in (tiny_sd_path / "README.md").read_text().lower()
    assert text_hidden_size(str(tiny_sd_path)) == 32


def test_img2img_with_prompt_embeds_is_seeded(tiny_sd_path):
    pipe = load_img2img_pipeline(str(tiny_sd_path), device="cpu", attention="sdpa")
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    neg = unconditional_embeds(pipe, 4, 32)  # (1, K, D)
    assert neg.shape == (1, 4, 32)
    cond = torch.randn(2, 4, 32)
    image = torch.rand(2, 3, 64, 64)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe(
            image=image,
            prompt_embeds=cond,
            negative_prompt_embeds=neg.expand(2, -1, -1),
            strength=0.5,
            guidance_scale=3.0,
            num_inference_steps=4,
            generator=g,
            output_type="np",
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 64, 64, 3)
    assert (a == b).all()
    assert not (a == c).all()


def test_not_a_diffusers_folder_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(SDLoadError, match="not a diffusers folder"):
        check_sd_source(str(tmp_path / "weights"))
    with pytest.raises(SDLoadError, match="no such folder"):
        check_sd_source(str(tmp_path / "missing"))


def test_xformers_request_without_xformers_says_how_to_install(tiny_sd_path):
    pytest.importorskip("diffusers")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    pipe = load_img2img_pipeline(str(tiny_sd_path), device="cpu", attention="sdpa")
    with pytest.raises(ImportError, match=r"d4ir-pipeline\[xformers\]"):
        set_attention_backend(pipe, "xformers")
    assert set_attention_backend(pipe, "auto") == "sdpa"  # CPU: auto falls back to SDPA
