"""GPU synthesis benchmark: SD 1.5-sized UNet + VAE built from config (random weights, no download).

Runs the project's own batch code (``d4ir_pipeline.ccd.CCD``: batched VAE encode with
per-sample noise, img2img under prompt tokens with CFG, decode, checks) at 512x512,
strength 0.5, 30 steps (so 15 UNet calls of batch 2B), fp16, for batch 8 and 16, with
PyTorch SDPA and with xformers when installed. Prints images/s (GPU side, PNG encoding
excluded; its CPU cost per image is printed separately) and the UNet's achieved TFLOP/s
(FLOPs counted with torch.utils.flop_counter on one UNet call, time measured with CUDA
events around every UNet call). Random weights run the same kernels as real ones.

One command on any CUDA machine:

    python benchmarks/gpu_synthesis.py                 # batch 8 and 16, SDPA (+ xformers)
    python benchmarks/gpu_synthesis.py --compile --channels-last --json gpu.json

Without CUDA it stops with a clear message (``--allow-cpu`` runs a tiny smoke version).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Stable Diffusion 1.5's published configs, declared once (d4ir sd15-shaped writes the same folder)
from d4ir_pipeline.demo.sd15_shaped import SD15_SCHEDULER, SD15_UNET, SD15_VAE  # noqa: E402


def build_pipeline(device, dtype):
    """An SD 1.5-sized img2img pipeline with random weights (no text encoder: prompts are tokens)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    unet.to(dtype=dtype).requires_grad_(False).eval()
    vae.to(dtype=dtype).requires_grad_(False).eval()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    n = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet {n / 1e6:.0f} M parameters (SD 1.5: 860 M), VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M"
    )
    return pipe


def unet_flops(unet, batch: int, latent: int, tokens: int) -> int:
    """FLOPs of one UNet call at CFG batch 2*batch (SDPA processors, so attention is counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    p = next(unet.parameters())
    x = torch.zeros(2 * batch, 4, latent, latent, device=p.device, dtype=p.dtype)
    ctx = torch.zeros(2 * batch, tokens, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device=p.device), encoder_hidden_states=ctx)
    return int(counter.get_total_flops())


class UNetTimer:
    """CUDA events around every UNet forward: the UNet's own GPU time, summed."""

    def __init__(self, unet):
        import torch

        self.torch, self.pairs = torch, []
        self.handles = [
            unet.register_forward_pre_hook(self._start),
            unet.register_forward_hook(self._stop),
        ]

    def _start(self, *_):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pairs.append([ev, None])

    def _stop(self, *_):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pairs[-1][1] = ev

    def reset(self):
        self.pairs = []

    def seconds(self) -> float:
        self.torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0

    def calls(self) -> int:
        return len(self.pairs)


def bench_one(pipe, *, backend: str, batch: int, args, flops_per_call: int) -> dict:
    """Warm up, then time ``args.repeats`` batches of the project's CCD batch call."""
    import numpy as np
    import torch

    from d4ir_pipeline.stage1.ccd import CCD, CCDInput, denoise_steps, sample_seed
    from d4ir_pipeline.stage1.sd import set_attention_backend

    set_attention_backend(pipe, backend)
    d = pipe.unet.config.cross_attention_dim
    ccd = CCD(pipe, steps=args.steps, guidance=args.guidance, uncond=torch.zeros(1, args.tokens, d))
    rng = np.random.default_rng(0)
    k = denoise_steps(args.strength, args.steps)
    items = [
        CCDInput(
            key=f"b{i}",
            image=rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8),
            prompt=torch.randn(args.tokens, d),
            denoise=k,
            seeds=(sample_seed(0, f"b{i}"),),  # one seed: no retries, so every UNet call is one counted call
        )
        for i in range(batch)
    ]
    on_cuda = pipe.unet.device.type == "cuda"
    timer = UNetTimer(pipe.unet) if on_cuda else None
    for _ in range(args.warmup):
        ccd(items)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timer.reset()
    t0 = time.perf_counter()
    dropped = 0
    for _ in range(args.repeats):
        dropped += sum(o.failure is not None for o in ccd(items))
    if on_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    row = {
        "backend": backend,
        "batch": batch,
        "images_per_s": batch * args.repeats / wall,
        "unet_calls": k * args.repeats,
        "dropped": dropped,  # random weights could overflow in fp16: counted, never retried here
    }
    if on_cuda:
        unet_s = timer.seconds()
        row.update(
            unet_calls=timer.calls(),
            unet_seconds=unet_s,
            unet_share_of_wall=unet_s / wall,
            unet_tflops=flops_per_call * timer.calls() / unet_s / 1e12,
            peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
        for h in timer.handles:
            h.remove()
    return row


def png_ms(resolution: int) -> float:
    """CPU milliseconds to PNG-encode one output (what the shard writer's threads do)."""
    import numpy as np

    from d4ir_pipeline.common.images import encode_image

    arr = np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(5):
        encode_image(arr, "png")
    return (time.perf_counter() - t0) / 5 * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--tokens", type=int, default=77, help="prompt length K (77 = a text prompt's cost)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--backends", nargs="+", default=["sdpa", "xformers"], choices=["sdpa", "xformers"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (long warm-up)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke-run on the CPU (use tiny --resolution/--steps)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "error: benchmarks/gpu_synthesis.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a CUDA machine; "
            "--allow-cpu runs a tiny smoke version (e.g. --resolution 64 --steps 2 --batches 1).",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"device: {card}; torch {torch.__version__}; {args.resolution}px, {args.steps} steps, strength "
          f"{args.strength}, guidance {args.guidance}, {str(dtype).replace('torch.', '')}")  # fmt: skip
    pipe = build_pipeline(device, dtype)
    from d4ir_pipeline.stage1.ccd import configure_pipeline

    backends = []
    for b in args.backends:
        if b == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                print("xformers: not installed, skipped (pip install 'd4ir-pipeline[xformers]')")
                continue
            if device.type != "cuda":
                print("xformers: needs CUDA, skipped")
                continue
        backends.append(b)
    latent = args.resolution // 8
    flops = {}
    for batch in args.batches:  # counted before compile, with SDPA (xformers kernels do the same math)
        from d4ir_pipeline.stage1.sd import set_attention_backend

        set_attention_backend(pipe, "sdpa")
        flops[batch] = unet_flops(pipe.unet, batch, latent, args.tokens)
    configure_pipeline(pipe, channels_last=args.channels_last, compile_unet=args.compile)
    rows = []
    for backend in backends:
        for batch in args.batches:
            row = bench_one(pipe, backend=backend, batch=batch, args=args, flops_per_call=flops[batch])
            row["unet_gflop_per_call"] = flops[batch] / 1e9
            rows.append(row)
            tf = (
                f", UNet {row['unet_tflops']:.1f} TFLOP/s ({row['unet_share_of_wall']:.0%} of wall)"
                if "unet_tflops" in row
                else ""
            )
            mem = f", peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else ""
            print(f"{backend:9s} batch {batch:3d}: {row['images_per_s']:7.2f} images/s{tf}{mem}", flush=True)
    enc = png_ms(args.resolution)
    print(f"PNG encoding on the CPU: {enc:.1f} ms per {args.resolution}px image (runtime.workers threads overlap it)")
    result = {"device": card, "torch": torch.__version__, "dtype": str(dtype), "resolution": args.resolution,
              "steps": args.steps, "strength": args.strength, "compile": args.compile,
              "channels_last": args.channels_last, "png_ms_per_image": enc, "rows": rows}  # fmt: skip
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
