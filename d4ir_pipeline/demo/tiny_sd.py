"""A tiny, randomly initialised Stable Diffusion 1.x-layout folder for tests and the demo.

Its images are meaningless: it exists to exercise the exact ``from_pretrained`` code
path used with real SD weights (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json), on a CPU, in seconds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import click

from d4ir_pipeline.common.io import atomic_dir, atomic_write_json, atomic_write_text
from d4ir_pipeline.demo.sd15_shaped import bytes_to_unicode, model_index

logger = logging.getLogger(__name__)

README = """# Tiny random Stable Diffusion (d4ir-pipeline)

Randomly initialised weights in the Stable Diffusion 1.x folder layout, written by
`d4ir tiny-sd`. Its images are MEANINGLESS: it exists only to exercise the pipeline's
real `from_pretrained` loading code on a CPU. Never report numbers made with it as
D4IR results.
"""


@dataclass(frozen=True)
class TinySDSpec:
    """Sizes of the tiny model; small enough for 2 CPU cores, same layout as SD 1.x."""

    hidden_size: int = 32  # text-encoder width D (768 in SD 1.x); prompt tokens are (K, D)
    block_out_channels: tuple[int, ...] = (32, 64)  # two UNet levels: fast on CPU
    vae_channels: tuple[int, ...] = (32, 64)  # VAE downsamples by 2 per extra block (SD: 8x)
    sample_size: int = 32  # UNet latent size; 64 px images with this VAE
    seed: int = 0  # weights are seeded so the folder is reproducible


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (256 byte symbols, their end-of-word forms, specials)."""
    symbols = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    # a few merges so common weather words are single tokens (keeps prompts short)
    for word in ("rain", "haze", "snow", "photo", "heavy", "fog"):
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tiny_sd(out: str | Path, spec: TinySDSpec = TinySDSpec(), *, overwrite: bool = False) -> Path:
    """Write the tiny SD folder to ``out`` (built in a staging folder beside it, then renamed)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    if (out / "model_index.json").is_file() and not overwrite:
        logger.info("tiny SD already at %s (use --overwrite to rebuild)", out)
        return out
    with atomic_dir(out) as tmp:  # a staging folder beside `out`, renamed into place when complete
        torch.manual_seed(spec.seed)
        vocab, merges = _byte_vocab()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        tokenizer.save_pretrained(tmp / "tokenizer")

        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=spec.hidden_size,
            intermediate_size=2 * spec.hidden_size,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            projection_dim=spec.hidden_size,
        )
        CLIPTextModel(text_config).save_pretrained(tmp / "text_encoder")

        n = len(spec.block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=spec.sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=spec.block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=spec.hidden_size,
            attention_head_dim=8,
            norm_num_groups=min(32, spec.block_out_channels[0]),
        )
        unet.save_pretrained(tmp / "unet")

        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=min(32, spec.vae_channels[0]),
            sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
        )
        vae.save_pretrained(tmp / "vae")

        # SD 1.x's noise schedule, with DDIM (deterministic for a given seed).
        DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ).save_pretrained(tmp / "scheduler")
        index = model_index("StableDiffusionImg2ImgPipeline", "DDIMScheduler", feature_extractor=(None, None))
        atomic_write_json(tmp / "model_index.json", index)
        atomic_write_text(tmp / "README.md", README)
        atomic_write_json(tmp / "d4ir_tiny_sd.json", {"spec": json.loads(json.dumps(spec.__dict__))})
    logger.info("wrote tiny random SD (D=%d) to %s: its images are meaningless", spec.hidden_size, out)
    return out


@click.command("tiny-sd")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hidden-size", default=TinySDSpec.hidden_size, show_default=True, help="Text-encoder width D.")
@click.option("--seed", default=TinySDSpec.seed, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if OUT already holds a model.")
def tiny_sd_command(out: str, hidden_size: int, seed: int, overwrite: bool) -> None:
    """Write a tiny random Stable Diffusion folder (meaningless images; for tests and the demo)."""
    path = write_tiny_sd(out, TinySDSpec(hidden_size=hidden_size, seed=seed), overwrite=overwrite)
    click.echo(f"tiny SD written to {path} (random weights: its images are meaningless)")
