"""The paper's comparison table in one command (`d4ir compare`, `make table`).

For one teacher, one student architecture, one budget (steps, batch, patch) and a list of
seeds, every input source is distilled into the same student and evaluated on the same
paired test sets, once per seed:

    distilled from the teacher (the same pixel loss against the frozen teacher):
    data_kd   the teacher's own paired training inputs, packed into shards (upper bound)
    web       the web-collected degraded photos, packed into shards (domain shift)
    d4ir      CCD synthesis under DPA prompt tokens (`d4ir synthesize`, the method)
    sd_text   the same CCD under plain text prompts (ablation of the DPA)
    noise     seeded random images (naive data-free lower bound)
    dfmc      a generator trained jointly with the student (GAN-based data-free baseline)
    unsupervised (no teacher; the paper's "mainstream unsupervised methods"):
    unpaired  CycleGAN-style: the student's architecture trained on the unpaired web-clean
              and web-degraded images alone (paper/unpaired.py)
    prior     dark-channel-prior dehazing with guided-filter refinement (paper/prior.py;
              haze only, no training, no seed)

plus the teacher itself and the degraded input as reference rows. Every distilled row
except DFMC becomes a shard set in the synthesis contract format, so ``distill`` streams
each one unchanged.

Seeds (``[budget] seeds``, ``--seeds 0,1,2``): every learned row trains once per seed, and
the seed is everything that row draws: the student's (init, data order, crops), the
synthesis's (``ccd.seed``: D4IR, SD + text), the noise images', the generators' (DFMC,
unpaired). The DPA and the prompt bank are upstream inputs, like the teacher: built once.
The table shows the mean ± sample std over seeds and marks where D4IR's difference to a
row is within the two rows' combined std. Recipe of :func:`compare`:

1. load the synthesize / distill / evaluate configs of the same profile, and apply the
   budget, teacher and student of this config to them;
2. (demo) build what is missing upstream (demo data, tiny SD, DPA + prompt bank); load the
   teacher and the test sets, once;
3. the reference rows; per learned row and seed: build (or reuse) its shard set, train (or
   reuse) the student, evaluate (or reuse) it; the prior row; a row whose inputs are missing
   is skipped with the reason;
4. write ``table.md``, ``table.json`` and the two figures under ``output.dir``.

Cache: every shard set, training run and evaluation lives under ``output.dir/cache`` in a
folder named by the hash of everything that determines it (config, input hashes, teacher
identity, student spec, budget, seed), so rows share work, a rerun repeats nothing and
prints the same table, a new seed trains only that seed, and changing one setting redoes
only what depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.images import decode_rgb, image_grid, save_png
from d4ir_pipeline.common.io import atomic_write_json, atomic_write_text, read_json, sha256_bytes, sha256_file
from d4ir_pipeline.common.runtime import pick_device, torch_threads
from d4ir_pipeline.config import (
    config_hash,
    config_to_dict,
    load_stage_config,
    opt,
    redefault,
)
from d4ir_pipeline.data.manifests import load_manifest, open_pair, open_rgb, write_manifest
from d4ir_pipeline.demo.data import build_demo_data
from d4ir_pipeline.demo.tiny_sd import write_tiny_sd
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import load_model
from d4ir_pipeline.models.cost import count_params
from d4ir_pipeline.paper.baselines import pack_manifest_to_shards, write_noise_shards
from d4ir_pipeline.paper.dfmc import DFMCConfig, generator_samples, train_dfmc
from d4ir_pipeline.paper.prior import WEATHERS as PRIOR_WEATHERS
from d4ir_pipeline.paper.prior import DCPConfig, dehaze_model
from d4ir_pipeline.paper.table import (
    ROW_TITLES,
    ROWS,
    SHORT_TITLES,
    WEATHERS,
    FigureModel,
    RowResult,
    aggregate,
    average,
    format_table,
    restorations_figure,
    sd_description,
    teacher_description,
    unresolved,
)
from d4ir_pipeline.paper.unpaired import UnpairedConfig, degrade, image_set, train_unpaired
from d4ir_pipeline.shardset.format import SHARDSET_KIND, SHARDSET_NAME, read_listing
from d4ir_pipeline.shardset.reader import iter_tar
from d4ir_pipeline.stage1.ccd import prepare_image
from d4ir_pipeline.stage1.dpa.config import DPAConfig
from d4ir_pipeline.stage1.dpa.train import train_dpa
from d4ir_pipeline.stage1.prompt_bank import BankConfig, PromptBank, build_prompt_bank
from d4ir_pipeline.stage1.sd import SDLoadError, check_sd_source, model_id
from d4ir_pipeline.stage1.synthesize import SynthesizeConfig, synthesize
from d4ir_pipeline.stage2.distill import DistillConfig, distill
from d4ir_pipeline.stage2.evaluate import FR_METRICS, EvalConfig, build_fr_metrics, score_pairs
from d4ir_pipeline.stage2.labels import label
from d4ir_pipeline.stage2.teacher import Teachers, teacher_identity, with_tiling

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class StagesSection:
    """The other stages' configs this table reuses (same profile and work dir by default)."""

    profile: str = opt("{profile}", help="profile whose stage configs are read (default: this one)")
    work: str = opt("{work}", help="work dir substituted into those configs' {work}")
    synthesize: str = opt("", help="synthesize config file; empty = stages/<profile>/synthesize.toml")
    distill: str = opt("", help="distill config file; empty = stages/<profile>/distill.toml")
    evaluate: str = opt("", help="evaluate config (test sets, when `eval.manifests` is empty); empty = the profile's")
    dpa: str = opt("", help="train-dpa config (used only to build a missing prompt bank); empty = the profile's")
    prompt_bank: str = opt("", help="prompt-bank config (used only to build a missing bank); empty = the profile's")


@dataclass(frozen=True)
class TeacherSection:
    """The teacher; empty values keep the distill config's teacher."""

    checkpoint: str = opt("", help="'reference', a save_model folder or a weights file; empty = distill config's")
    arch: str = opt("", help="architecture for a bare weights file (registry name or 'pkg.module:Class')")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments for `arch`")


@dataclass(frozen=True)
class SDSection:
    """The Stable Diffusion of the D4IR and SD + text rows; empty keeps the synthesize config's."""

    model: str = opt("", help="diffusers SD folder or hub id (make table SD_MODEL=...); empty = synthesize config's")


@dataclass(frozen=True)
class StudentSection:
    """The student every row trains; empty name keeps the distill config's student."""

    name: str = opt("", help="registry name or 'pkg.module:Class'; empty = distill config's student")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments of the student")


@dataclass(frozen=True)
class BudgetSection:
    """The training budget shared by every row (and the sizes of the generated inputs)."""

    steps: int = opt(2000, help="student optimizer steps per row (DFMC, unpaired: generator steps too)", min=1)
    batch: int = opt(8, help="crops per step", min=2)
    patch: int = opt(128, help="crop side for training (DFMC: generated image side, a multiple of 8)", min=8)
    seeds: tuple[int, ...] = opt(
        (0,),
        help="one training run of every learned row per seed (the student's, the synthesis', the noise's, the "
        "generators' seed); the table shows mean ± std over them",
        min=0,
    )
    warmup: int = opt(100, help="learning-rate warm-up steps (capped at a tenth of `steps`)", min=0)
    synth_images: int = opt(0, help="clean images used by CCD synthesis (0 = the synthesize config's)", min=0)
    pack_images: int = opt(
        0, help="images packed for the data-KD and web rows, spread evenly over the sorted manifest (0 = all)", min=0
    )
    noise_samples: int = opt(0, help="noise images (0 = as many as the D4IR shard set holds)", min=0)
    eval_images: int = opt(0, help="test images per weather (0 = all)", min=0)
    workers: int = opt(-1, help="data-loader workers for distillation (-1 = the distill config's)", min=-1)


@dataclass(frozen=True)
class QuickSection(BudgetSection):
    """`--quick`: the budget that runs the whole demo table on 2 CPU cores in minutes.

    The same keys as [budget], meaning the same; only the defaults below are smaller
    (batch and seeds are [budget]'s).
    """

    steps: int = redefault(BudgetSection, "steps", 150)
    patch: int = redefault(BudgetSection, "patch", 32)
    warmup: int = redefault(BudgetSection, "warmup", 15)
    synth_images: int = redefault(BudgetSection, "synth_images", 48)
    pack_images: int = redefault(BudgetSection, "pack_images", 96)
    noise_samples: int = redefault(BudgetSection, "noise_samples", 96)
    eval_images: int = redefault(BudgetSection, "eval_images", 10)
    workers: int = redefault(
        BudgetSection,
        "workers",
        0,
        help="data-loader workers for distillation (-1 = the distill config's; 0, the default here, decodes in "
        "the training process: least overhead on 2 cores)",
    )


@dataclass(frozen=True)
class PackSection:
    """An image manifest packed into a shard set (data-KD and web rows)."""

    manifest: str = opt("", help="image manifest (JSON Lines); its input images become the row's training inputs")
    root: str = opt("{work}/data", help="image root the manifest's paths are relative to")
    size: int = opt(0, help="resize short side + centre crop to this (0 = keep the images as they are)", min=0)


@dataclass(frozen=True)
class TextSection:
    """The SD + text prompt ablation: CCD under plain text prompts instead of DPA tokens."""

    prompts: dict[str, str] = opt(
        default_factory=lambda: {
            "rain": "a photo taken in heavy rain",
            "haze": "a photo taken in thick haze",
            "snow": "a photo taken in heavy snow",
        },
        help="weather -> text prompt; encoded once by the SD text encoder",
    )


@dataclass(frozen=True)
class NoiseSection:
    """The noise row."""

    kind: str = opt(
        "mixed",
        help="uniform i.i.d. pixels, smooth low-frequency noise, or a mix",
        choices=("uniform", "smooth", "mixed"),
    )
    size: int = opt(0, help="image side (0 = the synthesis resolution, as the synthetic samples)", min=0)


@dataclass(frozen=True)
class DFMCSection:
    """The GAN (DFMC-style) row; see baselines.train_dfmc."""

    z_dim: int = opt(64, help="latent size of the generator", min=1)
    g_width: int = opt(64, help="generator channels at its coarsest level", min=8)
    g_lr: float = opt(1e-3, help="generator Adam learning rate", min=0.0)
    s_lr: float = opt(0.0, help="student learning rate (0 = the distill config's)", min=0.0)
    adv_weight: float = opt(1.0, help="weight of the adversarial (discrepancy-maximising) term", min=0.0)
    contrast_weight: float = opt(0.1, help="weight of the InfoNCE diversity regulariser", min=0.0)
    contrast_tau: float = opt(0.1, help="InfoNCE temperature", min=1e-3)
    contrast_sigma: float = opt(0.2, help="z perturbation giving the positive view", min=0.0)


@dataclass(frozen=True)
class UnpairedSection:
    """The CycleGAN-style unsupervised row (paper/unpaired.py): web-clean + web-degraded images, no teacher."""

    clean_manifest: str = opt("", help="web-clean manifest; empty = the synthesize config's `data.manifest`")
    clean_root: str = opt("", help="its image root; empty = the synthesize config's `data.root`")
    size: int = opt(0, help="resize short side + centre crop both image sets to this (0 = as they are)", min=0)
    conditioned: bool = opt(
        True, help="condition the clean -> degraded generator and its discriminator on the weather label"
    )
    lr: float = opt(0.0, help="Adam learning rate of generators and discriminators (0 = the distill config's)", min=0.0)
    cycle_weight: float = opt(10.0, help="weight of the cycle-consistency L1 (CycleGAN: 10)", min=0.0)
    identity_weight: float = opt(
        0.1,
        help="identity L1 weight as a fraction of `cycle_weight` (CycleGAN: 0.5; 0.1 here: at 0.5 the restorer "
        "stayed near the identity within a short budget on the procedural-haze test problem)",
        min=0.0,
    )
    pool_size: int = opt(50, help="generated-image history shown to the discriminators (CycleGAN: 50; 0 = off)", min=0)
    g_width: int = opt(32, help="channels of the clean -> degraded generator", min=4)
    g_blocks: int = opt(4, help="residual blocks of the clean -> degraded generator", min=0)
    d_width: int = opt(32, help="first-layer channels of the PatchGAN discriminators", min=4)
    d_layers: int = opt(3, help="stride-2 layers of each PatchGAN", min=1)


@dataclass(frozen=True)
class PriorSection:
    """The dark-channel-prior row (paper/prior.py, He et al. 2009 / 2010); haze only."""

    patch: int = opt(15, help="dark-channel window side (the paper: 15)", min=1)
    omega: float = opt(0.95, help="fraction of the haze removed (the paper: 0.95)", min=0.0, max=1.0)
    top: float = opt(
        0.001, help="brightest dark-channel fraction searched for the airlight (the paper: 0.1 %)", min=0.0
    )
    t0: float = opt(0.1, help="lower bound of the transmission (the paper: 0.1)", min=0.0, max=1.0)
    radius: int = opt(60, help="guided-filter radius", min=1)
    eps: float = opt(1e-3, help="guided-filter regularisation", min=0.0)


@dataclass(frozen=True)
class EvalSection:
    """Paired test sets, one per weather (laid out like Rain100L / SOTS / Snow100K)."""

    manifests: dict[str, str] = opt(
        default_factory=dict, help="weather -> paired manifest (input + target); empty = the evaluate config's"
    )
    root: str = opt("", help="image root of the test manifests; empty = the evaluate config's (or {work}/data)")
    teacher_tile: int = opt(
        0, help="teacher tiled inference above this side on test images (0 = evaluate config's)", min=0
    )
    y_channel: bool = opt(True, help="table shows PSNR/SSIM on the Y channel (BT.601), the benchmarks' convention")
    figure_images: int = opt(2, help="test images per weather in the restoration figure", min=1)
    figure_samples: int = opt(8, help="samples per source in the input figure", min=1)


@dataclass(frozen=True)
class RuntimeSection:
    """Device and CPU threads for everything this command runs in-process."""

    device: str = opt("auto", help="'auto' (cuda when available), 'cpu' or 'cuda[:N]' for evaluation, DFMC, figures")
    threads: int = opt(
        0, help="torch CPU threads (0 = torch's default); 1 avoids oversubscription on a busy CPU", min=0
    )
    teacher_labels: bool = opt(
        True,
        help="cache the teacher's outputs on each shard set once (`d4ir label`, the distill config's `labels.format`) "
        "so every seed's student reads them instead of running the teacher each step; png labels are the teacher's "
        "outputs rounded to 8 bits (distill `labels.use = 'off'` also turns this off)",
    )


@dataclass(frozen=True)
class PrepareSection:
    """Build missing upstream inputs (the demo); off for real data, where rows are skipped instead."""

    demo_data: bool = opt(False, help="generate the embedded demo data into eval.root when it is missing")
    tiny_sd: bool = opt(False, help="write the tiny random SD to the synthesize config's sd.model when missing")
    prompt_bank: bool = opt(False, help="train the DPA and write the prompt bank when the bank is missing")


@dataclass(frozen=True)
class OutputSection:
    """Where the table, figures and cache go."""

    dir: str = opt("{work}/compare", help="table.md, table.json, figures; cache/ holds every reusable output")


@dataclass(frozen=True)
class CompareConfig:
    """`d4ir compare` (stages/<profile>/compare.toml)."""

    rows: tuple[str, ...] = opt(ROWS, help="rows to run, in table order", choices=ROWS)
    stages: StagesSection = field(default_factory=StagesSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sd: SDSection = field(default_factory=SDSection)
    student: StudentSection = field(default_factory=StudentSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    quick: QuickSection = field(default_factory=QuickSection)
    data_kd: PackSection = field(default_factory=PackSection)
    web: PackSection = field(default_factory=PackSection)
    sd_text: TextSection = field(default_factory=TextSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    dfmc: DFMCSection = field(default_factory=DFMCSection)
    unpaired: UnpairedSection = field(default_factory=UnpairedSection)
    prior: PriorSection = field(default_factory=PriorSection)
    eval: EvalSection = field(default_factory=EvalSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    output: OutputSection = field(default_factory=OutputSection)


# ---------------------------------------------------------------------------------------
# results


class SkipRow(D4IRError):
    """A row whose inputs are missing; the message says what is missing and how to get it."""


@dataclass
class CompareResult:
    """What `d4ir compare` produced."""

    out_dir: Path
    table_md: Path
    table_json: Path
    figures: dict[str, Path]
    rows: list[RowResult]
    header: dict
    markdown: str
    seconds: float


# ---------------------------------------------------------------------------------------
# hashing and cache folders


def _hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (16 hex digits suffice for folder names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _complete_shardset(path: Path) -> dict | None:
    """The ``shardset.json`` of a complete set in ``path``, or None."""

    f = path / SHARDSET_NAME
    if not f.is_file():
        return None
    doc, _ = read_listing(f, SHARDSET_KIND)
    return doc if doc.get("complete") is True else None


@dataclass
class _TestSet:
    """The paired test images of every weather (loaded once)."""

    weathers: list[str]
    images: dict[str, list[tuple[str, np.ndarray, np.ndarray]]]  # weather -> [(id, input, target)] uint8 HWC
    manifests: dict[str, str]
    manifest_sha256: dict[str, str]
    tile: int = 0  # teacher tiling on these images (0 = whole images)
    tile_overlap: int = 32


@dataclass
class _Ctx:
    """Everything the rows share, built once."""

    cfg: CompareConfig
    budget: BudgetSection
    quick: bool
    out: Path
    cache: Path
    synth_cfg: Any  # SynthesizeConfig | None (seed-free: `_synth_config` applies a seed)
    distill_cfg: Any  # DistillConfig (seed-free: `_distill_row` applies a seed)
    student_spec: dict
    device: Any
    teacher_ident: dict = field(default_factory=dict)
    teachers: Teachers | None = None  # the frozen teacher(s), loaded once per run, tiled as the test sets ask
    tests: _TestSet | None = None
    sources: dict[tuple[str, int], Path] = field(default_factory=dict)  # (row, seed) -> shard set / run folder
    figure: list[FigureModel] = field(default_factory=list)  # the first seed's models, in table order
    metrics: Any = None  # evaluate.build_fr_metrics(device), built on first use
    clean_records: dict | None = None  # web-clean manifest by id (input figure)
    unpaired_sets: Any = None  # (clean, degraded) unpaired.ImageSet, loaded on first use


# ---------------------------------------------------------------------------------------
# 1. the other stages' configs


def _load_stage(cls: type, explicit: str, stage: str, cfg: CompareConfig) -> Any:
    """Another stage's config, exactly as its own command would load it (``explicit``: a file instead)."""
    return load_stage_config(cls, stage, profile=cfg.stages.profile, config=explicit or None, work_dir=cfg.stages.work)


def _distill_config(cfg: CompareConfig, budget: BudgetSection) -> Any:
    """The profile's distill config with this table's teacher, student and budget."""

    d = _load_stage(DistillConfig, cfg.stages.distill, "distill", cfg)
    teacher = d.teacher
    if cfg.teacher.checkpoint:
        teacher = dataclasses.replace(
            teacher, checkpoint=cfg.teacher.checkpoint, arch=cfg.teacher.arch, kwargs=dict(cfg.teacher.kwargs)
        )
    student = d.student
    if cfg.student.name:
        student = dataclasses.replace(student, name=cfg.student.name, kwargs=dict(cfg.student.kwargs))
    student = dataclasses.replace(student, tag="student")
    data = dataclasses.replace(d.data, batch_size=budget.batch, patch=budget.patch)
    if budget.workers >= 0:
        data = dataclasses.replace(data, num_workers=budget.workers)
    train = dataclasses.replace(
        d.train,
        steps=budget.steps,
        warmup_steps=min(budget.warmup, budget.steps // 10),
        ckpt_every=max(1, min(d.train.ckpt_every, budget.steps)),
    )
    return dataclasses.replace(d, teacher=teacher, student=student, data=data, train=train)


def _synth_or_none(cfg: CompareConfig) -> Any:
    """The profile's synthesize config (with this table's SD), or None: the SD rows are then skipped."""
    try:
        sc = _load_stage(SynthesizeConfig, cfg.stages.synthesize, "synthesize", cfg)
    except D4IRError as e:
        logger.warning("compare: no synthesize config (%s); the D4IR and SD + text rows will be skipped", e)
        return None
    return dataclasses.replace(sc, sd=dataclasses.replace(sc.sd, model=cfg.sd.model)) if cfg.sd.model else sc


def _subset_manifest(ctx: _Ctx, manifest: str | os.PathLike, n: int) -> Path:
    """``manifest`` itself, or (``n`` > 0 and fewer than it lists) ``n`` records spread evenly over its sorted ids.

    "The first n" of an id-sorted manifest is one weather or one source photo (ids start with
    them): an even spread keeps every weather and photo in a limited budget.
    """
    records = sorted(load_manifest(manifest), key=lambda r: r.id)
    if not n or n >= len(records):
        return Path(manifest)
    picked = [records[(i * len(records)) // n] for i in range(n)]
    out = ctx.cache / "manifests" / f"{Path(manifest).stem}-{n}-{sha256_file(manifest)[:12]}.jsonl"
    if not out.is_file():
        write_manifest(out, picked)
    return out


# ---------------------------------------------------------------------------------------
# 2. upstream inputs the demo can build, the teacher and the test sets


def _prepare(ctx: _Ctx) -> None:
    """Build missing demo inputs (data, tiny SD, DPA + prompt bank) when the config allows it."""
    cfg = ctx.cfg
    if cfg.prepare.demo_data:
        root = Path(next(iter(_test_sources(cfg).roots.values()), cfg.eval.root))
        if not (root / "demo_data.json").is_file():
            logger.info("compare: building the demo data in %s", root)
            build_demo_data(root, seed=0)
    sc = ctx.synth_cfg
    if sc is None:
        return
    work = Path(cfg.stages.work).resolve()
    sd_path = Path(sc.sd.model).resolve()
    if cfg.prepare.tiny_sd and not sd_path.exists() and (sd_path == work or work in sd_path.parents):
        # only inside the work dir: a missing hub id or user path is reported, never replaced by a random model
        logger.info("compare: writing the tiny random SD to %s", sc.sd.model)
        write_tiny_sd(sc.sd.model)
    if cfg.prepare.prompt_bank and not (Path(sc.bank.dir) / "tokens.safetensors").is_file():
        _build_prompt_bank(ctx)


def _build_prompt_bank(ctx: _Ctx) -> None:
    """Train the DPA and write the prompt bank with the profile's own configs (each stage resumes)."""
    cfg, sc = ctx.cfg, ctx.synth_cfg
    bank_cfg = _load_stage(BankConfig, cfg.stages.prompt_bank, "prompt-bank", cfg)
    if Path(bank_cfg.output.dir).resolve() != Path(sc.bank.dir).resolve():
        raise D4IRError(
            f"the prompt-bank config writes `output.dir` = {bank_cfg.output.dir!r} but the synthesize config reads "
            f"`bank.dir` = {sc.bank.dir!r}: make them the same folder (the `{{bank}}` path of the profile)"
        )
    logger.info("compare: the prompt bank %s is missing: training the DPA and writing the bank", sc.bank.dir)
    train_dpa(_load_stage(DPAConfig, cfg.stages.dpa, "dpa", cfg))
    build_prompt_bank(bank_cfg)


def _load_teacher(ctx: _Ctx) -> None:
    """The frozen teacher(s) and identity, once, tiled as the test sets ask (one per weather with `by_weather`)."""
    tc = ctx.distill_cfg.teacher
    ctx.teacher_ident = teacher_identity(tc)
    ctx.teachers = Teachers(with_tiling(tc, ctx.tests.tile, ctx.tests.tile_overlap), ctx.device)


def _for_weather(model: Any, weather: str) -> Any:
    """The model function for test images of ``weather``: the teacher of that weather, else ``model`` itself."""
    return model.for_weather(weather) if isinstance(model, Teachers) else model


@dataclass(frozen=True)
class _TestSources:
    manifests: dict[str, str]  # weather -> paired manifest
    roots: dict[str, str]  # weather -> image root
    tile: int  # teacher tiling for large test images (0 = whole images)
    tile_overlap: int


def _test_sources(cfg: CompareConfig) -> _TestSources:
    """The test sets: this config's `eval.manifests`, else the profile's evaluate config (with its tiling)."""
    if cfg.eval.manifests:
        root = cfg.eval.root or f"{cfg.stages.work}/data"
        return _TestSources(dict(cfg.eval.manifests), {w: root for w in cfg.eval.manifests}, cfg.eval.teacher_tile, 32)

    ec = _load_stage(EvalConfig, cfg.stages.evaluate, "evaluate", cfg)
    root = cfg.eval.root or ec.data.root
    roots = {w: ec.data.roots.get(w, root) for w in ec.data.manifests}
    tile = cfg.eval.teacher_tile or ec.teacher.tile
    return _TestSources(dict(ec.data.manifests), roots, tile, ec.teacher.tile_overlap)


def _load_testset(cfg: CompareConfig, budget: BudgetSection) -> _TestSet:
    src = _test_sources(cfg)
    manifests = src.manifests
    images: dict[str, list] = {}
    shas: dict[str, str] = {}
    for weather, path in manifests.items():
        if not Path(path).is_file():
            logger.warning("compare: test manifest %s for %s does not exist; that weather is left out", path, weather)
            continue
        recs = sorted(load_manifest(path), key=lambda r: r.id)[: budget.eval_images or None]
        pairs = [(r.id, *(np.asarray(im, dtype=np.uint8) for im in open_pair(src.roots[weather], r))) for r in recs]
        images[weather] = pairs
        shas[weather] = sha256_file(path)
    if not images:
        raise D4IRError(f"test manifests {manifests}: none exists; the table needs paired test sets (`eval.manifests`)")
    order = [w for w in WEATHERS if w in images] + sorted(w for w in images if w not in WEATHERS)
    return _TestSet(order, images, {w: manifests[w] for w in order}, shas, src.tile, src.tile_overlap)


# ---------------------------------------------------------------------------------------
# 3. sources: one shard set per row and seed (cached by content hash)


def _pack_source(ctx: _Ctx, row: str, seed: int) -> Path:
    """The row's manifest packed into a shard set; the same for every seed (only the student's seed differs)."""
    sec: PackSection = getattr(ctx.cfg, row)
    what = "the teacher's paired training data" if row == "data_kd" else "the web-collected degraded images"
    if not sec.manifest:
        raise SkipRow(f"`{row}.manifest` is empty: give the manifest of {what}")
    manifest = Path(sec.manifest)
    if not manifest.is_file():
        raise SkipRow(f"`{row}.manifest` = {str(manifest)!r} does not exist ({what}; build it with `d4ir manifest`)")
    if not Path(sec.root).is_dir():
        raise SkipRow(f"`{row}.root` = {sec.root!r} does not exist (the images of {manifest})")
    subset = _subset_manifest(ctx, manifest, ctx.budget.pack_images)
    key = {"row": row, "manifest_sha256": sha256_file(subset), "size": sec.size}
    out = ctx.cache / "shards" / f"{row}-{_hash(key)}"
    if _complete_shardset(out) is None:
        pack_manifest_to_shards(
            subset,
            sec.root,
            out,
            origin=row.replace("_", "-"),
            size=sec.size,
            min_shards=max(1, ctx.distill_cfg.data.num_workers),
        )
    return out


def _synth_config(ctx: _Ctx, seed: int, bank_dir: str | None = None, mix: dict | None = None) -> Any:
    """The profile's synthesize config at ``seed``, on the budget's images, optionally on another bank."""
    sc = ctx.synth_cfg
    manifest = _subset_manifest(ctx, sc.data.manifest, ctx.budget.synth_images or sc.data.limit)
    data = dataclasses.replace(sc.data, manifest=str(manifest), limit=0)
    bank = sc.bank
    if bank_dir is not None:
        bank = dataclasses.replace(bank, dir=bank_dir, use="entry", mix=mix if mix is not None else bank.mix)
    workers = max(1, ctx.distill_cfg.data.num_workers)
    per = max(1, math.ceil(len(load_manifest(manifest)) * sc.ccd.samples_per_image / workers))
    output = dataclasses.replace(sc.output, shard_size=min(sc.output.shard_size, per))
    ccd = dataclasses.replace(sc.ccd, seed=seed)
    return dataclasses.replace(sc, data=data, bank=bank, output=output, ccd=ccd)


def _synth_key(sc: Any) -> dict:
    """What determines a synthesis output: its config hash (less paths / speed knobs) and input hashes."""
    return {
        "config": config_hash(sc),  # without its affects_output=False keys (paths, speed knobs)
        "manifest_sha256": sha256_file(sc.data.manifest),
        "bank_sha256": sha256_file(Path(sc.bank.dir) / "tokens.safetensors"),
        "sd": model_id(sc.sd.model),
    }


def _run_synthesis(ctx: _Ctx, row: str, sc: Any) -> Path:
    out = ctx.cache / "shards" / f"{row}-{_hash(_synth_key(sc))}"
    if _complete_shardset(out) is None:
        logger.info("compare: synthesising the %s shard set (seed %d) into %s", row, sc.ccd.seed, out)
        res = synthesize(dataclasses.replace(sc, output=dataclasses.replace(sc.output, dir=str(out))))
        if not res.complete:
            raise D4IRError(f"synthesis into {out} did not complete; rerun `d4ir compare` to resume it")
    return out


def _check_sd(ctx: _Ctx) -> None:
    if ctx.synth_cfg is None:
        raise SkipRow("no synthesize config for this profile (stages/<profile>/synthesize.toml)")
    try:
        check_sd_source(ctx.synth_cfg.sd.model)
    except SDLoadError as e:
        raise SkipRow(f"{e} (run `make tiny-sd` for the demo, or pass SD_MODEL=/path/to/sd15)") from e
    if not Path(ctx.synth_cfg.data.manifest).is_file():
        raise SkipRow(f"synthesize `data.manifest` = {ctx.synth_cfg.data.manifest!r} (web-clean images) does not exist")


def _d4ir_source(ctx: _Ctx, seed: int) -> Path:
    _check_sd(ctx)
    bank = Path(ctx.synth_cfg.bank.dir)
    if not (bank / "tokens.safetensors").is_file():
        raise SkipRow(f"prompt bank {str(bank)!r} is missing: run `make dpa prompt-bank` (train-dpa, prompt-bank)")
    return _run_synthesis(ctx, "d4ir", _synth_config(ctx, seed))


def _sd_text_source(ctx: _Ctx, seed: int) -> Path:
    _check_sd(ctx)
    sc = ctx.synth_cfg
    if not sc.sd.text_encoder:
        raise SkipRow("the synthesize config loads SD without its text encoder (`sd.text_encoder` = false)")
    prompts = dict(ctx.cfg.sd_text.prompts)
    if not prompts:
        raise SkipRow("`sd_text.prompts` is empty")
    bank_dir = ctx.cache / "text-bank" / _hash({"sd": model_id(sc.sd.model), "prompts": prompts})
    if not (bank_dir / "tokens.safetensors").is_file():
        write_text_prompt_bank(sc.sd.model, prompts, bank_dir)
    mix = {w: v for w, v in sc.bank.mix.items() if w in prompts} if sc.bank.mix else {}
    return _run_synthesis(ctx, "sd_text", _synth_config(ctx, seed, str(bank_dir), mix))


def _noise_source(ctx: _Ctx, seed: int) -> Path:
    n = ctx.budget.noise_samples
    if not n:
        d4 = ctx.sources.get(("d4ir", seed))
        doc = _complete_shardset(d4) if d4 is not None else None
        if doc is None:
            raise SkipRow("`noise_samples` = 0 asks for as many samples as the D4IR row, which did not run")
        n = int(doc["num_samples"])
    side = ctx.cfg.noise.size or (ctx.synth_cfg.data.resolution if ctx.synth_cfg is not None else ctx.budget.patch)
    side = max(side, ctx.budget.patch)
    key = {"kind": ctx.cfg.noise.kind, "n": n, "side": side, "seed": seed}
    out = ctx.cache / "shards" / f"noise-{_hash(key)}"
    if _complete_shardset(out) is None:
        write_noise_shards(
            out,
            num=n,
            size=(side, side),
            kind=ctx.cfg.noise.kind,
            seed=seed,
            min_shards=max(1, ctx.distill_cfg.data.num_workers),
        )
    return out


def write_text_prompt_bank(sd_model: str, prompts: dict[str, str], out: str | os.PathLike) -> Path:
    """A prompt bank (stage1/prompt_bank format) whose entries are the SD text encoder's embeddings of ``prompts``.

    One entry per weather, K = 77 tokens (the whole CLIP context, as plain text-to-image
    SD uses it), so CCD's unconditional branch (the empty prompt's first K states) is
    standard classifier-free guidance: this is img2img with a text prompt, no DPA.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    # 1. only the tokenizer and text encoder are needed (no UNet / VAE in memory)
    check_sd_source(sd_model)
    weathers = sorted(prompts)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(sd_model, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(sd_model, subfolder="text_encoder").eval()
    except OSError as e:
        raise SkipRow(f"`sd.model` = {sd_model!r}: no usable tokenizer/ + text_encoder/ ({e})") from e
    # 2. the same call as diffusers' pipeline: padded to 77 tokens, last hidden state
    tok = tokenizer(
        [prompts[w] for w in weathers],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        emb = encoder(tok.input_ids)[0].float().contiguous()  # (W, 77, D)
    # 3. the bank's one writer; one entry per weather, so each entry is its weather's centroid
    rows = [
        {"id": f"text/{w}", "sha256": sha256_bytes(prompts[w].encode()), "weather": w, "text": prompts[w]}
        for w in weathers
    ]
    meta = {
        "adapter_sha256": None,
        "sd_model": model_id(sd_model),
        "created": "text-prompts",
        "source": "text-prompts",
        "prompts": prompts,
    }
    PromptBank.write(out, emb, rows, meta=meta)
    return Path(out)


SOURCES: dict[str, Callable[[_Ctx, int], Path]] = {
    "data_kd": lambda ctx, seed: _pack_source(ctx, "data_kd", seed),
    "web": lambda ctx, seed: _pack_source(ctx, "web", seed),
    "d4ir": _d4ir_source,
    "sd_text": _sd_text_source,
    "noise": _noise_source,
}


# ---------------------------------------------------------------------------------------
# 4. students: distillation, DFMC or the unpaired restorer, cached per seed


def _distill_row(ctx: _Ctx, row: str, shards: Path, seed: int) -> tuple[Path, bool]:
    """Distil the row's student from ``shards`` at ``seed``; returns (student dir, cached)."""
    base = ctx.distill_cfg
    dc = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
    use_labels = ctx.cfg.runtime.teacher_labels and dc.labels.use != "off"
    key = {
        # what does not change the trained student is left out: the resume-free keys, the paths
        "config": config_hash(dc, exclude=("data.shards",)),  # and the affects_output=False keys (output.dir)
        "shardset_sha256": sha256_file(shards / "shardset.json"),
        "teacher": ctx.teacher_ident["id"],
        "targets": f"labels-{dc.labels.format}" if use_labels else "teacher",
    }
    out = ctx.cache / "runs" / f"{row}-{_hash(key)}"
    run_cfg = dataclasses.replace(
        dc,
        output=dataclasses.replace(dc.output, dir=str(out)),
        data=dataclasses.replace(dc.data, shards=str(shards)),
        log=dataclasses.replace(dc.log, progress=True),
    )
    done = out / "student" / "result.json"
    student_dir = out / "student" / "student"
    if done.is_file() and (student_dir / "model.json").is_file() and read_json(done).get("steps") == dc.train.steps:
        return student_dir, True
    if use_labels:  # the teacher once over the shard set (shared by every seed); distill reads its outputs
        label(run_cfg)
    res = distill(run_cfg)
    return Path(res.student_dir), False


def _dfmc_row(ctx: _Ctx, seed: int) -> tuple[Path, bool]:
    b, d = ctx.budget, ctx.cfg.dfmc
    if ctx.distill_cfg.teacher.by_weather:
        raise SkipRow("DFMC inverts one teacher; `teacher.by_weather` gives one per weather (run it per teacher)")
    if b.patch % 8:
        raise SkipRow(f"DFMC generates patch x patch images: `budget.patch` = {b.patch} must be a multiple of 8")
    dcfg = DFMCConfig(
        z_dim=d.z_dim,
        g_width=d.g_width,
        g_lr=d.g_lr,
        s_lr=d.s_lr or ctx.distill_cfg.train.lr,
        adv_weight=d.adv_weight,
        contrast_weight=d.contrast_weight,
        contrast_tau=d.contrast_tau,
        contrast_sigma=d.contrast_sigma,
        grad_clip=ctx.distill_cfg.train.grad_clip or 1.0,
    )
    key = {
        "teacher": ctx.teacher_ident["id"],
        "student": ctx.student_spec,
        "dfmc": dataclasses.asdict(dcfg),
        "budget": [b.steps, b.batch, b.patch, seed],
    }
    out = ctx.cache / "dfmc" / f"dfmc-{_hash(key)}"
    ctx.sources[("dfmc", seed)] = out
    if (out / "student" / "model.json").is_file() and (out / "dfmc.json").is_file():
        return out / "student", True
    student_dir = train_dfmc(
        _float_teacher(ctx), ctx.student_spec, b.steps, b.batch, b.patch, seed, out, config=dcfg, device=ctx.device
    )
    return student_dir, False


def _float_teacher(ctx: _Ctx) -> Any:
    """The teacher in float32 for DFMC's gradients (a copy when it runs in half precision; never a reload)."""
    import copy

    import torch

    teacher, _ = ctx.teachers.model()
    if all(p.dtype == torch.float32 for p in teacher.parameters()):
        return teacher
    return copy.deepcopy(teacher).float()


def _unpaired_sets(ctx: _Ctx) -> tuple[Any, Any]:
    """The web-clean and web-degraded images of the unpaired row (the budget's subsets, as the other rows see)."""
    if ctx.unpaired_sets is not None:
        return ctx.unpaired_sets
    u, sc, web = ctx.cfg.unpaired, ctx.synth_cfg, ctx.cfg.web
    clean_m = u.clean_manifest or (sc.data.manifest if sc is not None else "")
    clean_root = u.clean_root or (sc.data.root if sc is not None else "")
    if not clean_m or not Path(clean_m).is_file():
        raise SkipRow(f"web-clean manifest {clean_m!r} does not exist (`unpaired.clean_manifest` or synthesize's)")
    if not web.manifest or not Path(web.manifest).is_file():
        raise SkipRow(f"`web.manifest` = {web.manifest!r} (the web-degraded images) does not exist")
    n_clean = ctx.budget.synth_images or (sc.data.limit if sc is not None else 0)
    clean = image_set(_subset_manifest(ctx, clean_m, n_clean), clean_root, size=u.size)
    degraded = image_set(_subset_manifest(ctx, web.manifest, ctx.budget.pack_images), web.root, size=u.size)
    ctx.unpaired_sets = clean, degraded
    return ctx.unpaired_sets


def _unpaired_row(ctx: _Ctx, seed: int) -> tuple[Path, bool]:
    clean, degraded = _unpaired_sets(ctx)
    b, u, tr = ctx.budget, ctx.cfg.unpaired, ctx.distill_cfg.train
    ucfg = UnpairedConfig(
        steps=b.steps,
        batch=b.batch,
        patch=b.patch,
        seed=seed,
        lr=u.lr or tr.lr,
        warmup=min(b.warmup, b.steps // 10),
        min_lr_ratio=tr.min_lr_ratio,
        cycle_weight=u.cycle_weight,
        identity_weight=u.identity_weight,
        pool_size=u.pool_size,
        conditioned=u.conditioned,
        g_width=u.g_width,
        g_blocks=u.g_blocks,
        d_width=u.d_width,
        d_layers=u.d_layers,
        checkpoint_every=max(1, min(tr.ckpt_every, b.steps)),
    )
    run = {k: v for k, v in dataclasses.asdict(ucfg).items() if k != "checkpoint_every"}
    key = {"student": ctx.student_spec, "unpaired": run, "clean": clean.digest, "degraded": degraded.digest}
    out = ctx.cache / "unpaired" / f"unpaired-{_hash(key)}"
    ctx.sources[("unpaired", seed)] = out
    if (out / "student" / "model.json").is_file():
        return out / "student", True
    return train_unpaired(clean, degraded, ctx.student_spec, out, config=ucfg, device=ctx.device), False


RUNS: dict[str, Callable[[_Ctx, int], tuple[Path, bool]]] = {"dfmc": _dfmc_row, "unpaired": _unpaired_row}


# ---------------------------------------------------------------------------------------
# 5. evaluation (cached per model and test set)


def _evaluate(
    ctx: _Ctx, name: str, model_key: str, model: Any | None, weathers: list[str] | None = None
) -> tuple[dict, bool]:
    """Per-weather mean PSNR / SSIM (Y and RGB, evaluate's pyiqa metrics) of ``model``; None = the input.

    Scored by ``evaluate.score_pairs``; cached under ``cache/eval`` by (model weights, test manifests, image count).
    """
    tests = ctx.tests
    weathers = weathers or tests.weathers
    key = {"model": model_key, "tests": tests.manifest_sha256, "n": ctx.budget.eval_images, "metrics": FR_METRICS}
    if weathers != tests.weathers:
        key["weathers"] = weathers
    path = ctx.cache / "eval" / f"{name}-{_hash(key)}.json"
    if path.is_file():
        return read_json(path)["metrics"], True
    if ctx.metrics is None:
        ctx.metrics = build_fr_metrics(ctx.device)
    metrics: dict[str, dict[str, float]] = {}
    for w in weathers:
        fn = {name: _for_weather(model, w)}
        scored = [sp.scores[name] for sp in score_pairs(fn, tests.images[w], ctx.metrics, device=ctx.device)]
        metrics[w] = {c: float(np.mean([s[c] for s in scored])) for c in ctx.metrics}
        metrics[w]["images"] = len(scored)
    atomic_write_json(path, {"key": key, "metrics": metrics})
    return metrics, False


def _run_model(model: Any, img: np.ndarray, device: Any) -> np.ndarray:
    """One image (H, W, 3) uint8 through a restoration model -> (H, W, 3) uint8 (clamped, rounded: as saved)."""
    import torch

    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].to(device).float() / 255.0
    with torch.no_grad():
        y = model(x).float().clamp(0, 1)  # (1, 3, H, W)
    return (y[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def _figure_model(ctx: _Ctx, label: str, model: Any, weathers: tuple[str, ...] | None = None) -> None:
    ctx.figure.append((label, lambda img, w: _run_model(_for_weather(model, w), img, ctx.device), weathers))


# ---------------------------------------------------------------------------------------
# 6. rows


def _reference_rows(ctx: _Ctx, teacher_params: int) -> list[RowResult]:
    """The degraded input and the teacher, scored once (they do not depend on a seed)."""
    teacher_key = f"{ctx.teacher_ident['id']}-tile{ctx.tests.tile}-{ctx.tests.tile_overlap}"
    rows = []
    for name, model, key in (("input", None, "identity"), ("teacher", ctx.teachers, teacher_key)):
        t0 = time.perf_counter()
        metrics, cached = _evaluate(ctx, name, key, model)
        rows.append(
            RowResult(
                row=name,
                title=ROW_TITLES[name],
                status="ok",
                metrics=metrics,
                average=average(metrics),
                params=teacher_params if model is not None else None,
                seconds={"eval": 0.0 if cached else round(time.perf_counter() - t0, 2)},
                cached={"eval": cached},
            )
        )
    _figure_model(ctx, SHORT_TITLES["teacher"], ctx.teachers)
    return rows


def _train_seed(ctx: _Ctx, row: str, seed: int) -> dict:
    """Source + student of ``row`` at ``seed`` (built or reused): student dir, shard set, timings, cache hits."""
    t0 = time.perf_counter()
    if row in RUNS:  # DFMC and the unpaired restorer train their own inputs: no shard set
        student_dir, cached = RUNS[row](ctx, seed)
        seconds = {"source+distill": 0.0 if cached else round(time.perf_counter() - t0, 2)}
        samples = sum(len(s) for s in ctx.unpaired_sets) if row == "unpaired" else None
        return {"student_dir": student_dir, "seconds": seconds, "cached": {"distill": cached}, "samples": samples}
    shards = SOURCES[row](ctx, seed)
    ctx.sources[(row, seed)] = shards
    t1 = time.perf_counter()
    student_dir, cached = _distill_row(ctx, row, shards, seed)
    seconds = {"source": round(t1 - t0, 2), "distill": 0.0 if cached else round(time.perf_counter() - t1, 2)}
    samples = int(read_json(shards / SHARDSET_NAME)["num_samples"])
    return {"student_dir": student_dir, "shards": shards, "seconds": seconds, "cached": {"distill": cached},
            "samples": samples}  # fmt: skip


def _learned_row(ctx: _Ctx, row: str) -> RowResult:
    """One training run (or cache hit) and evaluation per seed, then mean ± std over the seeds."""
    r = RowResult(row=row, title=ROW_TITLES[row], status="ok")
    for i, seed in enumerate(ctx.budget.seeds):
        try:
            run = _train_seed(ctx, row, seed)
        except SkipRow as e:
            r.status, r.reason = "skipped", str(e)
            logger.warning("compare: row %r skipped: %s", row, e)
            return r
        student = load_model(run["student_dir"], device=ctx.device)
        t0 = time.perf_counter()
        weights = sha256_file(Path(run["student_dir"]) / "model.safetensors")
        metrics, cached = _evaluate(ctx, row, weights, student)
        run["seconds"]["eval"] = 0.0 if cached else round(time.perf_counter() - t0, 2)
        run["cached"]["eval"] = cached
        r.per_seed[str(seed)] = {**run, "metrics": metrics, "average": average(metrics)}
        if i == 0:
            r.params, r.samples, r.student_dir = count_params(student), run["samples"], str(run["student_dir"])
            r.shards = str(run["shards"]) if "shards" in run else None
            _figure_model(ctx, SHORT_TITLES[row], student)
    for run in r.per_seed.values():
        for k, v in run["seconds"].items():
            r.seconds[k] = round(r.seconds.get(k, 0.0) + v, 2)
        for k, v in run["cached"].items():
            r.cached[k] = r.cached.get(k, True) and v
    aggregate(r)
    return r


def _prior_row(ctx: _Ctx) -> RowResult:
    """Dark channel prior on the weathers it addresses (haze); "-" elsewhere. No training, no seed."""
    r = RowResult(row="prior", title=ROW_TITLES["prior"], status="ok")
    weathers = [w for w in ctx.tests.weathers if w in PRIOR_WEATHERS]
    if not weathers:
        r.status, r.reason = "skipped", f"the prior addresses {list(PRIOR_WEATHERS)} only and no such test set is given"
        return r
    dcp = DCPConfig(**dataclasses.asdict(ctx.cfg.prior))
    model = dehaze_model(dcp)
    t0 = time.perf_counter()
    r.metrics, cached = _evaluate(ctx, "prior", _hash({"dcp": dataclasses.asdict(dcp), "version": 1}), model, weathers)
    r.seconds, r.cached = {"eval": 0.0 if cached else round(time.perf_counter() - t0, 2)}, {"eval": cached}
    _figure_model(ctx, SHORT_TITLES["prior"], model, tuple(weathers))
    return r


# ---------------------------------------------------------------------------------------
# the stage


def compare(cfg: CompareConfig, quick: bool = False, seeds: tuple[int, ...] | None = None) -> CompareResult:
    """Train and evaluate one student per input source and seed; write the table, JSON and figures.

    ``runtime.threads`` holds for the call; the caller's torch thread count is restored after it.
    """
    with torch_threads(cfg.runtime.threads):
        return _compare(cfg, quick, seeds)


def _compare(cfg: CompareConfig, quick: bool, seeds: tuple[int, ...] | None) -> CompareResult:
    t_start = time.perf_counter()
    # 1. the other stages' configs under this table's teacher, student and budget
    budget = cfg.quick if quick else cfg.budget
    budget = dataclasses.replace(budget, seeds=tuple(seeds)) if seeds is not None else budget
    if not budget.seeds or len(set(budget.seeds)) != len(budget.seeds):
        raise D4IRError(f"`seeds` = {list(budget.seeds)}: give one or more distinct seeds (e.g. --seeds 0,1,2)")
    distill_cfg = _distill_config(cfg, budget)
    ctx = _Ctx(
        cfg=cfg,
        budget=budget,
        quick=quick,
        out=Path(cfg.output.dir),
        cache=Path(cfg.output.dir) / "cache",
        synth_cfg=_synth_or_none(cfg),
        distill_cfg=distill_cfg,
        student_spec={"name": distill_cfg.student.name, "kwargs": dict(distill_cfg.student.kwargs)},
        device=pick_device(cfg.runtime.device),
    )
    # 2. upstream inputs (demo), test sets, the teacher (once)
    _prepare(ctx)
    ctx.tests = _load_testset(cfg, budget)
    _load_teacher(ctx)
    teacher_params = sum(count_params(m) for m in ctx.teachers.all_models())
    # 3. reference rows, the learned rows (per seed), the prior
    results = _reference_rows(ctx, teacher_params)
    for row in cfg.rows:
        results.append(_prior_row(ctx) if row == "prior" else _learned_row(ctx, row))
    # 4. outputs
    student_params = count_params(build_model(ctx.student_spec["name"], **ctx.student_spec["kwargs"]))
    header = {
        "teacher": {**teacher_description(ctx.teacher_ident), "params": teacher_params},
        "student": {
            "spec": ctx.student_spec,
            "params": student_params,
            "ratio": student_params / max(1, teacher_params),
        },
        "sd": sd_description(ctx.synth_cfg),
        "budget": dataclasses.asdict(budget),
        "quick": quick,
        "y_channel": cfg.eval.y_channel,
        "test_images": {w: len(ctx.tests.images[w]) for w in ctx.tests.weathers},
        "test_manifests": ctx.tests.manifests,
    }
    return _write_outputs(ctx, header, results, t_start)


def _write_outputs(ctx: _Ctx, header: dict, results: list[RowResult], t_start: float) -> CompareResult:
    """table.md, the two figures and table.json (numbers, per-seed runs, timings, the config)."""
    weathers = ctx.tests.weathers
    markdown = format_table(header, results, weathers)
    ctx.out.mkdir(parents=True, exist_ok=True)
    table_md = atomic_write_text(ctx.out / "table.md", markdown)
    figures = {}
    fig = _inputs_figure(ctx, ctx.out / "inputs.png")
    if fig is not None:
        figures["inputs"] = fig
    picks = [(w, inp, tgt) for w in weathers for _, inp, tgt in ctx.tests.images[w][: ctx.cfg.eval.figure_images]]
    figures["restorations"] = restorations_figure(picks, ctx.figure, ctx.out / "restorations.png")
    seconds = round(time.perf_counter() - t_start, 2)
    cols = ("psnr_y", "ssim_y") if header["y_channel"] else ("psnr_rgb", "ssim_rgb")
    doc = {
        "header": header,
        "weathers": weathers,
        "rows": [dataclasses.asdict(r) for r in results],
        "within_spread_of_d4ir": unresolved(results, cols),
        "figures": {k: str(v) for k, v in figures.items()},
        "seconds": seconds,
        "config": config_to_dict(ctx.cfg),
    }
    table_json = atomic_write_json(ctx.out / "table.json", doc)
    return CompareResult(ctx.out, table_md, table_json, figures, results, header, markdown, seconds)


def _parse_seeds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        seeds = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise click.BadParameter(f"{value!r}: expected one or more seeds >= 0, such as 0,1,2")
    return seeds


@stage_command("compare", CompareConfig)
@click.option("--quick", is_flag=True, help="Use the [quick] budget (the whole demo table on 2 CPU cores in minutes).")
@click.option(
    "--seeds",
    default=None,
    callback=_parse_seeds,
    metavar="0,1,2",
    help="Train every learned row once per seed (replaces the budget's `seeds`); cached seeds are reused.",
)
def compare_command(cfg: CompareConfig, quick: bool, seeds: tuple[int, ...] | None) -> None:
    """The paper's comparison: distilled rows (data KD, web, D4IR, SD + text, noise, GAN) and unsupervised ones."""
    res = compare(cfg, quick=quick, seeds=seeds)
    click.echo(res.markdown)
    click.echo(f"table: {res.table_md}  json: {res.table_json}  figures: {', '.join(map(str, res.figures.values()))}")
    click.echo(f"({res.seconds:.0f} s)")


# ---------------------------------------------------------------------------------------
# 7. the inputs figure


def _shard_samples(shards: Path, n: int, *, keys: list[str] | None = None) -> dict[str, dict[str, bytes]]:
    """Up to ``n`` samples (key -> {ext: bytes}) of a shard set, in manifest order, or the given keys."""
    _, listed = read_listing(shards / SHARDSET_NAME, SHARDSET_KIND)
    out: dict[str, dict[str, bytes]] = {}
    for s in listed:
        for k, files in iter_tar(s.path):
            if keys is None or k in keys:
                out[k] = files
        if len(out) >= (n if keys is None else len(keys)):
            break
    if keys is not None:
        return {k: out[k] for k in keys if k in out}
    return dict(list(out.items())[:n])


def _image_of(files: dict[str, bytes], prefix: str = "degraded.") -> np.ndarray | None:
    ext = next((e for e in files if e.startswith(prefix)), None)
    return np.asarray(decode_rgb(files[ext])[0], dtype=np.uint8) if ext else None


_LAST_UV = 1.0 - 1e-9  # a crop position in [0, 1) that ccd.prepare_image maps to the last pixel offset


def _clean_crop(ctx: _Ctx, meta: dict) -> np.ndarray | None:
    """The clean crop a synthetic sample was made from: ccd.prepare_image at its recorded crop box."""
    sc = ctx.synth_cfg
    if ctx.clean_records is None:
        ctx.clean_records = {r.id: r for r in load_manifest(sc.data.manifest)}
    rec = ctx.clean_records.get(meta.get("source_id"))
    box = tuple(meta.get("crop_box") or ())
    if rec is None or len(box) != 4:
        return None
    try:
        img = open_rgb(sc.data.root, rec)
    except BadImageError:
        return None
    res = sc.data.resolution
    # the last crop position (u, v -> 1) is (resized width - res, resized height - res): it turns the box into u, v
    _, last = prepare_image(img, res, "random", _LAST_UV, _LAST_UV)
    u, v = (box[0] + 0.5) / (last[0] + 1), (box[1] + 0.5) / (last[1] + 1)
    crop, got = prepare_image(img, res, "random", u, v)
    return np.asarray(crop, dtype=np.uint8) if got == box else None


def _synthetic_rows(ctx: _Ctx, n: int, seed: int) -> tuple[list, list[str], list[str] | None]:
    """Clean source / SD + text / D4IR / CycleGAN F rows on the SAME clean crops (D4IR's keys and weathers)."""
    d4, sdt = ctx.sources.get(("d4ir", seed)), ctx.sources.get(("sd_text", seed))
    if d4 is None:
        return [], [], None
    first = _shard_samples(d4, n)
    metas = [json.loads(f["json"]) for f in first.values()]
    weathers = [str(m.get("weather")) for m in metas]
    clean = [_image_of(f, "clean.") for f in first.values()]
    if any(c is None for c in clean):  # not kept in the shards: cut again from the web-clean image
        clean = [_clean_crop(ctx, m) for m in metas]
    rows, labels = [clean], ["clean source"]
    if sdt is not None:
        rows.append([_image_of(f) for f in _shard_samples(sdt, n, keys=list(first)).values()])
        labels.append(SHORT_TITLES["sd_text"])
    rows.append([_image_of(f) for f in first.values()])
    labels.append(SHORT_TITLES["d4ir"])
    run = ctx.sources.get(("unpaired", seed))
    if run is not None and (run / "degrader.json").is_file() and all(c is not None for c in clean):
        rows.append(degrade(run, clean, weathers))
        labels.append("CycleGAN F(clean)")
    return rows, labels, weathers


def _inputs_figure(ctx: _Ctx, path: Path) -> Path | None:
    """A grid of training inputs per source (the first seed's); the SD rows and CycleGAN share clean crops."""
    n, seed = ctx.cfg.eval.figure_samples, ctx.budget.seeds[0]
    rows, labels, col_labels = _synthetic_rows(ctx, n, seed)
    dfmc = ctx.sources.get(("dfmc", seed))
    if dfmc is not None and (dfmc / "generator.json").is_file():
        rows.append(generator_samples(dfmc, n, seed=seed))
        labels.append(SHORT_TITLES["dfmc"])
    for row in ("noise", "web", "data_kd"):
        src = ctx.sources.get((row, seed))
        if src is not None:
            rows.append([_image_of(f) for f in _shard_samples(src, n).values()])
            labels.append(SHORT_TITLES[row])
    if not rows:
        return None
    cell = max(64, min(160, ctx.synth_cfg.data.resolution if ctx.synth_cfg is not None else 96))
    save_png(path, image_grid(rows, cell=cell, labels=labels, col_labels=col_labels))
    return path
