"""Load Stable Diffusion with ``from_pretrained`` (local folder or hub id) and pick attention.

One loader serves real SD 1.x / 2.x weights and the tiny random model of ``tiny_sd``.
The unconditional branch of classifier-free guidance and the DPA tokens share one
length K (see :func:`unconditional_embeds`), so diffusers can concatenate them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.errors import D4IRError

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


class SDLoadError(D4IRError):
    """The SD path / hub id cannot be used."""


def _is_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists()


def check_sd_source(source: str) -> None:
    """Fail early on a local path that is not a diffusers folder (hub ids are checked on load)."""
    if not source:
        raise SDLoadError("`sd.model` is empty: give a diffusers folder or a hub id (e.g. a local SD 1.5 copy)")
    if _is_local(source):
        p = Path(source).expanduser()
        if not p.is_dir():
            raise SDLoadError(f"`sd.model` = {source!r}: no such folder")
        if not (p / "model_index.json").is_file():
            raise SDLoadError(
                f"`sd.model` = {source!r} is not a diffusers folder (no model_index.json); expected the layout "
                "unet/ vae/ scheduler/ [text_encoder/ tokenizer/] model_index.json (save_pretrained output)"
            )
        for sub in ("unet", "vae", "scheduler"):
            if not (p / sub).is_dir():
                raise SDLoadError(f"`sd.model` = {source!r}: missing the {sub}/ sub-folder of a diffusers SD folder")


def _read_config(source: str, sub: str) -> dict | None:
    if _is_local(source):
        f = Path(source).expanduser() / sub / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, f"{sub}/config.json")).read_text())
    except Exception as e:  # noqa: BLE001 - offline / missing repo: report below
        raise SDLoadError(f"`sd.model` = {source!r}: cannot read {sub}/config.json ({type(e).__name__}: {e})") from e


def text_hidden_size(source: str) -> int:
    """The prompt-token width D: the UNet's cross-attention width (= text encoder hidden size)."""
    check_sd_source(source)
    unet_cfg = _read_config(source, "unet")
    if unet_cfg is None:
        raise SDLoadError(f"`sd.model` = {source!r}: no unet/config.json")
    d = unet_cfg.get("cross_attention_dim")
    if isinstance(d, list | tuple):
        d = d[0]
    text_cfg = _read_config(source, "text_encoder") if _is_local(source) else None
    if text_cfg is not None and text_cfg.get("hidden_size") not in (None, d):
        logger.warning(
            "text encoder width %s differs from the UNet's cross-attention width %s", text_cfg["hidden_size"], d
        )
    return int(d)


def model_id(source: str) -> str:
    """A stable description of the model for manifests: hub id, or folder name + unet hash."""
    if not _is_local(source):
        return source
    p = Path(source).expanduser()
    weights = sorted((p / "unet").glob("*.safetensors")) + sorted((p / "unet").glob("*.bin"))
    if not weights:
        return f"{p.name}@unet-sha256:unknown"
    st = weights[0].stat()
    return f"{p.name}@unet-sha256:{_file_digest(str(weights[0].resolve()), st.st_size, st.st_mtime_ns)[:16]}"


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, mtime) in a process: SD 1.5's UNet is 3.4 GB and
    one compare run names the same model several times. ``size`` / ``mtime_ns`` key the cache."""

    return sha256_file(path)


def set_attention_backend(pipe_or_unet, backend: str = "auto") -> str:
    """Use xformers when asked (or 'auto' and available on CUDA), else PyTorch SDPA; log which."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"`attention` = {backend!r}: expected one of {list(ATTENTION_BACKENDS)}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    on_cuda = next(unet.parameters()).device.type == "cuda"
    want_xf = backend == "xformers" or (backend == "auto" and on_cuda)
    if want_xf:
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            if backend == "xformers":
                raise ImportError(
                    "`attention` = 'xformers' but xformers is not installed: pip install 'd4ir-pipeline[xformers]' "
                    "(CUDA only), or set attention = 'sdpa'"
                ) from e
            want_xf = False
        if want_xf and not on_cuda:
            if backend == "xformers":
                raise D4IRError("`attention` = 'xformers' needs a CUDA device; use 'sdpa' on the CPU")
            want_xf = False
    if want_xf:
        pipe_or_unet.enable_xformers_memory_efficient_attention()
        name = "xformers"
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        name = "sdpa"
    logger.info("attention backend: %s", "xformers (memory-efficient)" if name == "xformers" else "PyTorch SDPA")
    return name


def _dtype_kwarg() -> str:
    """Newer diffusers take ``dtype`` (``torch_dtype`` is deprecated); older ones only ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_img2img_pipeline(
    source: str,
    *,
    device=None,
    dtype=None,
    attention: str = "auto",
    scheduler: str | None = None,
    with_text_encoder: bool = True,
):
    """``StableDiffusionImg2ImgPipeline.from_pretrained(source)``, frozen, on ``device``.

    ``scheduler`` (e.g. 'DDIMScheduler') swaps the scheduler class keeping its config.
    Without a text encoder, prompts must be given as ``prompt_embeds``.
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    check_sd_source(source)
    kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if not with_text_encoder:
        kwargs.update(text_encoder=None, tokenizer=None)
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise SDLoadError(
            f"`sd.model` = {source!r}: from_pretrained failed ({e}). For a hub id without network, download it "
            "once elsewhere and pass the local folder (HF_HUB_OFFLINE=1 is honoured)"
        ) from e
    if scheduler:
        import diffusers

        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"`scheduler` = {scheduler!r}: not a diffusers scheduler class")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    set_attention_backend(pipe, attention)
    if device is not None and torch.device(device).type == "cpu":
        logger.debug("SD pipeline on the CPU")
    return pipe


def encode_text(pipe, prompts: list[str]):
    """Text-encoder hidden states for ``prompts``: (B, 77, D)."""
    import torch

    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise D4IRError("this SD pipeline was loaded without a text encoder; text prompts are unavailable")
    tok = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))
    return out[0]


def unconditional_embeds(pipe, k: int, d: int):
    """The CFG unconditional context of length K: the empty prompt's first K hidden states.

    diffusers concatenates conditional and unconditional contexts, so both must have
    the same length; DPA prompts are K tokens. Without a text encoder: zeros (1, K, D).
    """
    import torch

    if getattr(pipe, "text_encoder", None) is None:
        return torch.zeros(1, k, d, device=pipe.unet.device, dtype=pipe.unet.dtype)
    emb = encode_text(pipe, [""])  # (1, 77, D)
    if emb.shape[-1] != d:
        raise D4IRError(f"text encoder width {emb.shape[-1]} differs from the prompt width {d}")
    return emb[:, :k].to(pipe.unet.dtype)
