"""d4ir_pipeline.stage1.dpa.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from d4ir_pipeline.common.runtime import DTYPES
from d4ir_pipeline.config import config_hash, opt
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.sd import ATTENTION_BACKENDS

DEGRADED_WEATHERS = ("rain", "haze", "snow")


class DPADataError(D4IRError):
    """The DPA training / bank input cannot be used; raised before any training starts."""


@dataclass(frozen=True)
class DataSection:
    """The web-degraded images to train on."""

    manifest: str = opt("{data}/manifests/web-degraded.jsonl", help="Manifest of the web-degraded images.")
    root: str = opt("{data}", help="Image root the manifest's paths are relative to.", affects_output=False)
    require_labels: bool = opt(
        True, help="Every image must carry a weather label and >= 2 weathers must be present (supervised contrast)."
    )
    max_images: int = opt(0, min=0, help="Use N evenly spaced images (0: all); for quick runs.")
    load_size: int = opt(512, min=16, help="Short side every image is resized to at load (then cropped).")
    cache_images: bool = opt(
        True, help="Keep the loaded images in memory (fast; off for very large sets).", affects_output=False
    )
    crop_zoom: tuple[float, float] = opt(
        (0.75, 1.5),
        min=0.1,
        max=8.0,
        help="Side of the two random square crops, in units of the encoder input size (resized to it after).",
    )
    hflip: bool = opt(True, help="Random horizontal flips (weather is flip-invariant).")
    color_aug: bool = opt(
        True, help="Random RGB channel order and saturation (0.6-1.4x): weather is grey-white, content has colour."
    )
    veil_aug: float = opt(
        0.25,
        min=0.0,
        max=0.5,
        help="Max strength of a random grey veil + exposure change, so black level alone cannot tell a weather.",
    )


@dataclass(frozen=True)
class SDSection:
    """The frozen Stable Diffusion whose UNet the tokens must make sense to."""

    model: str = opt("{work}/tiny-sd", help="diffusers SD folder or hub id; D is read from its UNet config.")
    attention: str = opt("auto", choices=ATTENTION_BACKENDS, help="UNet attention backend.", affects_output=False)
    dtype: str = opt("float32", choices=DTYPES, help="dtype of the frozen SD weights (CUDA only).")
    resolution: int = opt(0, min=0, help="Pixel size of the diffusion-alignment crops; 0: the UNet's native size.")


@dataclass(frozen=True)
class EncoderSection:
    """The image encoder E."""

    kind: str = opt("conv", choices=("clip", "conv"), help="clip: CLIP vision tower; conv: small CNN from scratch.")
    clip_model: str = opt(
        "openai/clip-vit-large-patch14", help="CLIP vision weights: local folder or hub id.", affects_output=False
    )
    clip_projection: bool = opt(
        True, help="Use CLIPVisionModelWithProjection.image_embeds (as IP-Adapter) instead of the pooled output."
    )
    unfreeze_last: int = opt(0, min=0, help="clip: train the last N transformer blocks too (0: fully frozen).")
    image_size: int = opt(0, min=0, help="Encoder input size; 0: CLIP's native size, or 64 for conv.")
    conv_channels: tuple[int, ...] = opt((16, 32, 64, 128), min=1, help="conv: channels of the stride-2 stages.")


@dataclass(frozen=True)
class AdapterSection:
    """The adapter A: feature -> K tokens of width D."""

    tokens: int = opt(4, min=1, max=77, help="K prompt tokens per image (4-8 as in IP-Adapter).")
    hidden: int = opt(256, min=8, help="Hidden width of the adapter MLP.")


@dataclass(frozen=True)
class LossSection:
    """Loss weights and parameters."""

    contrastive: float = opt(1.0, min=0.0, help="Weight of the (supervised) contrastive loss.")
    temperature: float = opt(0.1, min=1e-3, max=10.0, help="InfoNCE temperature tau (SupCon uses 0.07-0.1).")
    supervised: bool = opt(True, help="Same-weather images are positives (instance-level only when false).")
    prototype: float = opt(
        1.0, min=0.0, help="Weight of InfoNCE against learnable weather prototypes (labelled images; see supcon_loss)."
    )
    diffusion: float = opt(1.0, min=0.0, help="Weight of the frozen SD's noise-prediction loss (alignment).")
    diffusion_batch: int = opt(0, min=0, help="Images per micro-batch in the diffusion loss (0: all of them).")
    cache_latents: bool = opt(
        True,
        help="Encode each image's whole-image latent once (VAE posterior) instead of a crop per step; "
        "costs N x 4 x (R/f)^2 x 8 bytes of memory.",
    )
    text_anchor: float = opt(0.0, min=0.0, help="Weight of the weather-phrase anchor (needs a text encoder).")
    weather_phrases: dict[str, str] = opt(
        default_factory=lambda: {
            "rain": "a photo taken in heavy rain, rain streaks",
            "haze": "a hazy photo, thick fog",
            "snow": "a photo taken in falling snow",
        },
        help="Weather -> phrase whose text embedding anchors that weather's centroid.",
    )


@dataclass(frozen=True)
class TrainSection:
    """Optimisation, checkpoints and resume."""

    steps: int = opt(300, min=1, help="Optimizer steps.")
    batch_size: int = opt(32, min=2, help="Images per micro-batch (each gives two crops).")
    grad_accum: int = opt(1, min=1, help="Micro-batches per optimizer step.")
    lr: float = opt(1e-3, min=0.0, help="Peak AdamW learning rate (cosine to 10% after warm-up).")
    weight_decay: float = opt(1e-4, min=0.0, help="AdamW weight decay.")
    warmup_steps: int = opt(20, min=0, help="Linear warm-up steps.")
    grad_clip: float = opt(1.0, min=0.0, help="Clip the gradient norm (0: off).")
    seed: int = opt(0, min=0, help="Seeds weights, data order, crops and diffusion noise.")
    amp: bool = opt(True, help="Automatic mixed precision on CUDA (ignored on the CPU).")
    amp_dtype: str = opt("bfloat16", choices=("bfloat16", "float16"), help="AMP dtype; float16 uses a GradScaler.")
    ckpt_every: int = opt(
        100, min=1, help="Save a resumable checkpoint every N steps (and at the end).", affects_output=False
    )
    ckpt_keep: int = opt(2, min=1, help="Number of step checkpoints kept.", affects_output=False)
    resume: bool = opt(
        True, help="Continue from the last checkpoint in the output dir (false: start over).", affects_output=False
    )


@dataclass(frozen=True)
class LogSection:
    """Progress and metrics."""

    every: int = opt(10, min=1, help="Write a metrics.jsonl line every N steps (and at the end).")
    progress: bool = opt(True, help="tqdm progress bar (shown on a terminal).")
    tensorboard: bool = opt(False, help="Also write TensorBoard event files to <output.dir>/tensorboard.")


@dataclass(frozen=True)
class ReportSection:
    """The DPA report: held-out weather accuracy and content invariance."""

    enabled: bool = opt(True, help="Write report.json after training.")
    test_manifests: tuple[str, ...] = opt(
        (
            "{data}/manifests/test-rain.jsonl",
            "{data}/manifests/test-haze.jsonl",
            "{data}/manifests/test-snow.jsonl",
        ),
        help="Paired test sets; their inputs whose source photo is not in training are the held-out set.",
    )
    test_root: str = opt("{data}", help="Image root of the test manifests.")
    knn_k: int = opt(5, min=1, help="k of the cosine k-NN weather classifier (the headline accuracy).")
    plot: bool = opt(True, help="Write embeddings.png (2-D PCA of the embeddings, coloured by weather).")


@dataclass(frozen=True)
class RuntimeSection:
    """Where the stage computes."""

    device: str = opt("auto", help="auto | cpu | cuda[:N].", affects_output=False)


@dataclass(frozen=True)
class OutputSection:
    """Where the stage writes."""

    dir: str = opt("{dpa}", help="Output folder (weights, checkpoints, metrics, report).")


@dataclass(frozen=True)
class DPAConfig:
    """Config of `d4ir train-dpa` (stages/<profile>/dpa.toml)."""

    data: DataSection = field(default_factory=DataSection)
    sd: SDSection = field(default_factory=SDSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection, metadata={"affects_output": False})
    report: ReportSection = field(default_factory=ReportSection, metadata={"affects_output": False})
    output: OutputSection = field(default_factory=OutputSection, metadata={"affects_output": False})
    runtime: RuntimeSection = field(default_factory=RuntimeSection, metadata={"affects_output": False})


def dpa_run_hash(cfg: DPAConfig) -> str:
    return config_hash(cfg)  # its affects_output=False keys do not change the trajectory: a resume may differ
