"""An SD 1.5-shaped diffusers folder with random weights and the REAL CLIP tokenizer.

Real-size runs (512 px, 77-token contexts, D = 768, a 860M-parameter UNet, a CLIP
ViT-L/14 image tower) must work before anyone has the weights at hand. This writes the
folder layout and the published configs of Stable Diffusion 1.5
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/ feature_extractor/ model_index.json``)
plus a CLIP ViT-L/14 vision tower (``image_encoder/``, the DPA encoder's
``encoder.clip_model``), all with random weights: its images are MEANINGLESS. The
tokenizer is not random: ``vocab.json`` / ``merges.txt`` are converted from the BPE file
that ships inside the ``openai-clip`` package, the vocabulary SD 1.5's tokenizer uses.

[design] Weights are stored in float16 by default (2.7 GB instead of 5.4 GB); the loaders
cast them to the run's dtype (float32 on the CPU). The safety checker is not written (its
weights would add 1.2 GB and every loader here passes ``safety_checker=None``), so
``model_index.json`` lists it as ``[null, null]`` and ``requires_safety_checker`` false.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

import click

from d4ir_pipeline.common.io import atomic_dir, atomic_write_json, atomic_write_text
from d4ir_pipeline.errors import D4IRError

logger = logging.getLogger(__name__)

__all__ = [
    "SD15_UNET",
    "SD15_VAE",
    "SD15_TEXT_ENCODER",
    "SD15_SCHEDULER",
    "CLIP_L14_VISION",
    "CLIP_IMAGE_PROCESSOR",
    "SD15_TOKENIZER_CONFIG",
    "PUBLISHED_PARAMETERS",
    "clip_bpe_path",
    "clip_vocab_and_merges",
    "write_clip_tokenizer",
    "build_sd15_modules",
    "write_sd15_shaped",
    "sd15_shaped_command",
]

# ------------------------------------------------------------------ published configs
# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that set the architecture; the
# rest are diffusers defaults that equal the published values).
SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "use_linear_projection": False,
}
# vae/config.json
SD15_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# text_encoder/config.json (= the text tower of openai/clip-vit-large-patch14). The token ids
# 0 / 1 / 2 are the published values (the tokenizer's are 49406 / 49407 / 49407); transformers
# reads eos_token_id == 2 as "pool at the highest id", which is the EOS position for CLIP.
SD15_TEXT_ENCODER: dict = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# scheduler/scheduler_config.json: SD 1.5 ships PNDM; `d4ir synthesize` swaps the class
# (sd.scheduler) keeping this config, as it does with the real weights.
SD15_SCHEDULER: dict = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# openai/clip-vit-large-patch14 config.json, vision_config (+ the shared projection_dim)
CLIP_L14_VISION: dict = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "projection_dim": 768,
}
# feature_extractor/preprocessor_config.json (also openai/clip-vit-large-patch14's)
CLIP_IMAGE_PROCESSOR: dict = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "image_processor_type": "CLIPImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
# tokenizer/tokenizer_config.json of SD 1.5 (pads with <|endoftext|>, unlike clip.tokenize's 0)
SD15_TOKENIZER_CONFIG: dict = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": True,
}
# millions of parameters as published (SD 1.5 model card / diffusers): what the configs must build
PUBLISHED_PARAMETERS: dict[str, float] = {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7, "image_encoder": 304.0}

README = """# SD 1.5-shaped random model (d4ir-pipeline)

Written by `d4ir sd15-shaped`: the folder layout and the published configs of Stable
Diffusion 1.5 (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M parameters) and a
CLIP ViT-L/14 vision tower in `image_encoder/` (for `encoder.clip_model`), with RANDOM
weights: its images are MEANINGLESS. The tokenizer is the real CLIP BPE vocabulary
(49,408 tokens, 77-token context), converted from the `openai-clip` package. It exists to
run the real-size code paths (shapes, memory, time); never report quality numbers made
with it.
"""

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merges openai-clip keeps: vocab = 2 x 256 bytes + merges + 2 specials
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


class SD15ShapedError(D4IRError):
    """The SD 1.5-shaped folder cannot be written (missing package, bad target)."""


# ------------------------------------------------------------------ tokenizer
def clip_bpe_path() -> Path:
    """The BPE merges file inside the installed ``openai-clip`` package (found without importing it:
    ``clip/__init__`` imports ``pkg_resources``, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.origin is None:
        raise SD15ShapedError(
            "the CLIP tokenizer is converted from the `openai-clip` package, which is not installed: "
            "pip install openai-clip (pyiqa depends on it)"
        )
    path = Path(spec.origin).parent / BPE_FILE
    if not path.is_file():
        raise SD15ShapedError(f"{path} is missing: the installed `clip` package is not openai-clip")
    return path


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte -> printable symbol table, in byte order of the vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49,408 entries) and its BPE merges, in rank order.

    The ids follow openai-clip's construction: 256 byte symbols, the same with ``</w>``,
    one token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SD15ShapedError(f"{path}: expected {N_MERGES} merges of two symbols, got {len(merges)}")
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SD15ShapedError(f"{path}: duplicate tokens in the converted vocabulary")
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer(out: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write SD 1.5's tokenizer folder (vocab.json, merges.txt, configs) that
    ``CLIPTokenizer.from_pretrained(out)`` reads: the files, not constructor arguments, are the
    contract (transformers 5 ignores ``CLIPTokenizer(vocab_file=...)``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    atomic_write_json(out / "tokenizer_config.json", SD15_TOKENIZER_CONFIG)
    specials = {k: SD15_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    atomic_write_json(out / "special_tokens_map.json", specials)
    return out


# ------------------------------------------------------------------ models
MODEL_NAMES = ("unet", "vae", "text_encoder", "image_encoder")


def build_sd15_modules(device: str = "meta", names: tuple[str, ...] = MODEL_NAMES):
    """SD 1.5's UNet, VAE and text encoder and CLIP ViT-L/14's vision tower from the configs above.

    On ``device='meta'`` nothing is allocated (parameter counts in milliseconds); on 'cpu' the
    weights are randomly initialised (seed with ``torch.manual_seed`` first).
    """
    import torch

    builders = {
        "unet": _build_unet,
        "vae": _build_vae,
        "text_encoder": _build_text_encoder,
        "image_encoder": _build_image_encoder,
    }
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"`names` = {unknown}: expected some of {sorted(builders)}")
    with torch.device(device):
        return {name: builders[name]() for name in names}


def _build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET)


def _build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD15_VAE)


def _build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))


def _build_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION))


def model_index(
    pipeline: str = "StableDiffusionPipeline",
    scheduler: str = "PNDMScheduler",
    feature_extractor: tuple[str | None, str | None] = ("transformers", "CLIPImageProcessor"),
) -> dict:
    """A diffusers ``model_index.json`` for an SD 1.x folder (unet, vae, CLIP text encoder and tokenizer)."""
    import diffusers

    return {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": list(feature_extractor),
        "image_encoder": [None, None],  # a vision tower in image_encoder/ is for the DPA, not the pipeline
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_model(folder: Path, name: str, i: int, seed: int, dtype: str, weights: bool) -> int:
    """Build model ``name`` (seed ``seed + i``, cast to ``dtype``) and save it, or only its config
    (``weights=False``, built on the meta device); returns its parameter count."""
    import torch

    if weights:
        torch.manual_seed(seed + i)
        module = build_sd15_modules("cpu", (name,))[name].to(getattr(torch, dtype))
        count = sum(p.numel() for p in module.parameters())
        module.save_pretrained(folder / name)
        logger.info("%s: %.1fM parameters, %s", name, count / 1e6, dtype)
        return count
    module = build_sd15_modules("meta", (name,))[name]
    if hasattr(module, "save_config"):
        module.save_config(folder / name)
    else:
        module.config.save_pretrained(folder / name)
    return sum(p.numel() for p in module.parameters())


def write_sd15_shaped(
    out: str | Path,
    *,
    dtype: str = "float16",
    seed: int = 0,
    weights: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the SD 1.5-shaped folder to ``out`` (built in a staging folder beside it, then renamed).

    ``weights=False`` writes the configs, tokenizer and index only (for tests of config
    resolution; diffusers cannot load such a folder).
    """
    import diffusers

    # 1. check inputs
    if dtype not in ("float16", "float32"):
        raise ValueError(f"`dtype` = {dtype!r}: expected 'float16' or 'float32'")
    out = Path(out)
    marker = out / "d4ir_sd15_shaped.json"
    if marker.is_file() and not overwrite:
        logger.info("SD 1.5-shaped folder already at %s (use --overwrite to rebuild)", out)
        return out
    if out.exists() and not marker.is_file() and any(out.iterdir()):
        raise SD15ShapedError(f"{out} exists and is not an sd15-shaped folder: refusing to replace it")
    bpe = clip_bpe_path()
    with atomic_dir(out) as tmp:  # a staging folder beside `out`, renamed into place when complete
        # 2. tokenizer, scheduler, preprocessors (small files)
        write_clip_tokenizer(tmp / "tokenizer", bpe)
        # the published file as is: it carries DDIM's keys too (clip_sample), which PNDM's constructor
        # refuses but from_config ignores, and which a swap to DDIMScheduler keeps
        (tmp / "scheduler").mkdir()
        atomic_write_json(
            tmp / "scheduler" / "scheduler_config.json",
            {"_class_name": "PNDMScheduler", "_diffusers_version": diffusers.__version__, **SD15_SCHEDULER},
        )
        for sub in ("feature_extractor", "image_encoder"):
            (tmp / sub).mkdir(exist_ok=True)
            atomic_write_json(tmp / sub / "preprocessor_config.json", CLIP_IMAGE_PROCESSOR)

        # 3. one model at a time: build (random, seeded), cast, save, free
        counts = {name: _write_model(tmp, name, i, seed, dtype, weights) for i, name in enumerate(MODEL_NAMES)}

        # 4. index, readme, marker (last: the marker says the folder is complete)
        atomic_write_json(tmp / "model_index.json", model_index())
        atomic_write_text(tmp / "README.md", README)
        atomic_write_json(
            tmp / "d4ir_sd15_shaped.json",
            {"seed": seed, "dtype": dtype, "weights": weights, "parameters": counts, "tokenizer_source": BPE_FILE},
        )
    logger.info("wrote SD 1.5-shaped random model to %s: its images are meaningless", out)
    return out


@click.command("sd15-shaped")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the weights (float16: 2.7 GB on disk).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if OUT already holds the model.")
def sd15_shaped_command(out: str, dtype: str, seed: int, overwrite: bool) -> None:
    """Write an SD 1.5-shaped diffusers folder (random weights, real CLIP tokenizer) to OUT."""
    path = write_sd15_shaped(out, dtype=dtype, seed=seed, overwrite=overwrite)
    click.echo(
        f"SD 1.5-shaped folder written to {path} (random weights: its images are meaningless); "
        f"DPA image tower: {path / 'image_encoder'}"
    )
