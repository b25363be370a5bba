"""The paper's comparison table in one command (`d4ir compare`, `make table`).

For one teacher, one student architecture, one budget (steps, batch, patch) and one
seed, every input source is distilled into the same student and evaluated on the same
paired test sets:

    data_kd  the teacher's own paired training inputs, packed into shards (upper bound)
    web      the web-collected degraded photos, packed into shards (domain shift)
    d4ir     CCD synthesis under DPA prompt tokens (`d4ir synthesize`, the method)
    sd_text  the same CCD under plain text prompts (ablation of the DPA)
    noise    seeded random images (naive data-free lower bound)
    dfmc     a generator trained jointly with the student (GAN-based data-free baseline)

plus the teacher itself and the degraded input as reference rows. Every row except
DFMC becomes a shard set in the synthesis contract format, so ``distill`` streams each
one unchanged. Recipe of :func:`compare`:

1. load the synthesize / distill / evaluate configs of the same profile, and apply the
   budget, teacher and student of this config to them;
2. (demo) build what is missing upstream: demo data, tiny SD, DPA + prompt bank;
3. per row: build (or reuse) its shard set, distill (or reuse) the student, evaluate
   (or reuse) it; a row whose inputs are missing is skipped with the reason;
4. write ``table.md``, ``table.json`` and the two figures under ``output.dir``.

Cache: every shard set, distillation and evaluation lives under ``output.dir/cache``
in a folder named by the hash of everything that determines it (config, input hashes,
teacher identity, student spec, budget), so rows share work, a rerun repeats nothing
and prints the same table, and changing one setting redoes only what depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.images import decode_rgb, image_grid, save_png
from d4ir_pipeline.common.io import atomic_write_json, atomic_write_text, read_json, sha256_bytes, sha256_file
from d4ir_pipeline.common.runtime import pick_device
from d4ir_pipeline.config import (
    config_hash,
    config_to_dict,
    load_config,
    load_stage_config,
    opt,
    redefault,
    stages_root,
)
from d4ir_pipeline.data.manifests import load_manifest, open_pair, open_rgb
from d4ir_pipeline.demo.data import build_demo_data
from d4ir_pipeline.demo.tiny_sd import write_tiny_sd
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import load_model
from d4ir_pipeline.models.cost import count_params
from d4ir_pipeline.paper.baselines import pack_manifest_to_shards, write_noise_shards
from d4ir_pipeline.paper.dfmc import DFMCConfig, generator_samples, train_dfmc
from d4ir_pipeline.paper.table import (
    ROW_TITLES,
    ROWS,
    WEATHERS,
    RowResult,
    format_table,
    sd_description,
    teacher_description,
)
from d4ir_pipeline.shardset.format import SHARDSET_NAME, read_listing
from d4ir_pipeline.shardset.reader import read_shard
from d4ir_pipeline.stage1.ccd import prepare_image
from d4ir_pipeline.stage1.dpa.config import DPAConfig
from d4ir_pipeline.stage1.dpa.train import train_dpa
from d4ir_pipeline.stage1.prompt_bank import BankConfig, PromptBank, build_prompt_bank
from d4ir_pipeline.stage1.sd import SDLoadError, check_sd_source, model_id
from d4ir_pipeline.stage1.synthesize import HASH_EXCLUDE, SynthesizeConfig, synthesize
from d4ir_pipeline.stage2.config import RESUME_FREE
from d4ir_pipeline.stage2.distill import DistillConfig, distill
from d4ir_pipeline.stage2.evaluate import FR_METRICS, EvalConfig, build_fr_metrics, score_pairs
from d4ir_pipeline.stage2.teacher import load_teacher, teacher_forward, teacher_identity

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

    steps: int = opt(2000, help="student optimizer steps per row (DFMC: student steps too)", min=1)
    batch: int = opt(8, help="crops per step", min=2)
    patch: int = opt(128, help="crop side for training (DFMC: generated image side, a multiple of 8)", min=8)
    seed: int = opt(0, help="seeds the students, data order, crops, noise and the generator", min=0)
    warmup: int = opt(100, help="learning-rate warm-up steps (capped at a tenth of `steps`)", min=0)
    synth_images: int = opt(0, help="clean images used by CCD synthesis (0 = the synthesize config's)", min=0)
    pack_images: int = opt(0, help="images packed for the data-KD and web rows (0 = all)", min=0)
    noise_samples: int = opt(0, help="noise images (0 = as many as the D4IR shard set holds)", min=0)
    eval_images: int = opt(0, help="test images per weather (0 = all)", min=0)
    workers: int = opt(-1, help="data-loader workers for distillation (-1 = the distill config's)", min=-1)


@dataclass(frozen=True)
class QuickSection(BudgetSection):
    """`--quick`: the budget that runs the whole demo table on 2 CPU cores in minutes.

    The same keys as [budget], meaning the same; only the defaults below are smaller
    (batch and seed are [budget]'s).
    """

    steps: int = redefault(BudgetSection, "steps", 300)
    patch: int = redefault(BudgetSection, "patch", 48)
    warmup: int = redefault(BudgetSection, "warmup", 20)
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
    doc, _ = read_listing(f, "d4ir-shardset")
    return doc if doc.get("complete") is True else None


@dataclass
class _Ctx:
    """Everything the rows share, built once."""

    cfg: CompareConfig
    budget: BudgetSection
    quick: bool
    out: Path
    cache: Path
    synth_cfg: Any  # shards.SynthesizeConfig | None
    distill_cfg: Any  # distill.DistillConfig
    teacher_ident: dict
    student_spec: dict
    device: Any
    sources: dict[str, Path] = field(default_factory=dict)  # row -> shard set (or DFMC run) folder
    metrics: Any = None  # evaluate.build_fr_metrics(device), built on first use
    teacher: Any = None  # the frozen teacher, loaded once per run
    clean_records: dict | None = None  # web-clean manifest by id (input figure)


# ---------------------------------------------------------------------------------------
# 1. the other stages' configs


def _load_stage(cls: type, explicit: str, stage: str, cfg: CompareConfig) -> Any:
    """Another stage's config, exactly as its own command would load it (``explicit``: a file instead)."""
    profile, work = cfg.stages.profile, cfg.stages.work
    if explicit and not (stages_root() / profile).is_dir():
        # an explicit file of a profile without a stages/ folder (tests, one-off configs): default [paths]
        return load_config(cls, explicit, work_dir=work, profile=profile)
    return load_stage_config(cls, stage, profile=profile, config=explicit or None, work_dir=work)


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
        seed=budget.seed,
        warmup_steps=min(budget.warmup, budget.steps // 10),
        ckpt_every=max(1, min(d.train.ckpt_every, budget.steps)),
    )
    return dataclasses.replace(d, teacher=teacher, student=student, data=data, train=train)


# ---------------------------------------------------------------------------------------
# 2. upstream inputs the demo can build


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
    if Path(bank_cfg.bank.out).resolve() != Path(sc.bank.dir).resolve():
        raise D4IRError(
            f"the prompt-bank config writes `bank.out` = {bank_cfg.bank.out!r} but the synthesize config reads "
            f"`bank.dir` = {sc.bank.dir!r}: make them the same folder (the `{{bank}}` path of the profile)"
        )
    logger.info("compare: the prompt bank %s is missing: training the DPA and writing the bank", sc.bank.dir)
    train_dpa(_load_stage(DPAConfig, cfg.stages.dpa, "dpa", cfg))
    build_prompt_bank(bank_cfg)


# ---------------------------------------------------------------------------------------
# 3. sources: one shard set per row (cached by content hash)


def _pack_source(ctx: _Ctx, row: str) -> Path:

    sec: PackSection = getattr(ctx.cfg, row)
    what = "the teacher's paired training data" if row == "data_kd" else "the web-collected degraded images"
    if not sec.manifest:
        raise SkipRow(f"`{row}.manifest` is empty: give the manifest of {what}")
    manifest = Path(sec.manifest)
    if not manifest.is_file():
        raise SkipRow(f"`{row}.manifest` = {str(manifest)!r} does not exist ({what}; build it with `d4ir manifest`)")
    if not Path(sec.root).is_dir():
        raise SkipRow(f"`{row}.root` = {sec.root!r} does not exist (the images of {manifest})")
    key = {"row": row, "manifest_sha256": sha256_file(manifest), "limit": ctx.budget.pack_images, "size": sec.size}
    out = ctx.cache / "shards" / f"{row}-{_hash(key)}"
    if _complete_shardset(out) is None:
        pack_manifest_to_shards(
            manifest,
            sec.root,
            out,
            origin=row.replace("_", "-"),
            limit=ctx.budget.pack_images,
            size=sec.size,
            min_shards=max(1, ctx.distill_cfg.data.num_workers),
        )
    return out


def _synth_config(ctx: _Ctx, bank_dir: str | None = None, mix: dict | None = None) -> Any:
    """The profile's synthesize config, limited to the budget's images, optionally on another bank."""
    sc = ctx.synth_cfg
    data = dataclasses.replace(sc.data, limit=ctx.budget.synth_images or sc.data.limit)
    bank = sc.bank
    if bank_dir is not None:
        bank = dataclasses.replace(bank, dir=bank_dir, use="entry", mix=mix if mix is not None else bank.mix)
    workers = max(1, ctx.distill_cfg.data.num_workers)
    per = max(1, math.ceil(_synth_samples(sc, data.limit) / workers))
    output = dataclasses.replace(sc.output, shard_size=min(sc.output.shard_size, per))
    return dataclasses.replace(sc, data=data, bank=bank, output=output)


def _synth_samples(sc: Any, limit: int) -> int:

    n = len(load_manifest(sc.data.manifest))
    return (min(n, limit) if limit else n) * sc.ccd.samples_per_image


def _synth_key(sc: Any) -> dict:
    """What determines a synthesis output: its config hash (less paths / speed knobs) and input hashes."""
    return {
        "config": config_hash(sc, exclude=HASH_EXCLUDE),
        "manifest_sha256": sha256_file(sc.data.manifest),
        "bank_sha256": sha256_file(Path(sc.bank.dir) / "tokens.safetensors"),
        "sd": model_id(sc.sd.model),
    }


def _run_synthesis(ctx: _Ctx, row: str, sc: Any) -> Path:

    out = ctx.cache / "shards" / f"{row}-{_hash(_synth_key(sc))}"
    if _complete_shardset(out) is None:
        logger.info("compare: synthesising the %s shard set into %s", row, out)
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


def _d4ir_source(ctx: _Ctx) -> Path:
    _check_sd(ctx)
    bank = Path(ctx.synth_cfg.bank.dir)
    if not (bank / "tokens.safetensors").is_file():
        raise SkipRow(f"prompt bank {str(bank)!r} is missing: run `make dpa prompt-bank` (train-dpa, prompt-bank)")
    return _run_synthesis(ctx, "d4ir", _synth_config(ctx))


def _sd_text_source(ctx: _Ctx) -> Path:
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
    return _run_synthesis(ctx, "sd_text", _synth_config(ctx, str(bank_dir), mix))


def _noise_source(ctx: _Ctx) -> Path:

    n = ctx.budget.noise_samples
    if not n:
        d4 = ctx.sources.get("d4ir")
        doc = _complete_shardset(d4) if d4 is not None else None
        if doc is None:
            raise SkipRow("`noise_samples` = 0 asks for as many samples as the D4IR row, which did not run")
        n = int(doc["num_samples"])
    side = ctx.cfg.noise.size or (ctx.synth_cfg.data.resolution if ctx.synth_cfg is not None else ctx.budget.patch)
    side = max(side, ctx.budget.patch)
    key = {"kind": ctx.cfg.noise.kind, "n": n, "side": side, "seed": ctx.budget.seed}
    out = ctx.cache / "shards" / f"noise-{_hash(key)}"
    if _complete_shardset(out) is None:
        write_noise_shards(
            out,
            num=n,
            size=(side, side),
            kind=ctx.cfg.noise.kind,
            seed=ctx.budget.seed,
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
    # 3. the bank's one writer; each entry is its weather's centroid
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
    PromptBank.write(out, emb, rows, meta=meta)  # one entry per weather: each is its weather's centroid
    return Path(out)


# ---------------------------------------------------------------------------------------
# 4. students: distillation (or DFMC), cached


def _distill_row(ctx: _Ctx, row: str, shards: Path) -> tuple[Path, bool]:
    """Distil the row's student from ``shards``; returns (student dir, cached)."""

    dc = ctx.distill_cfg
    key = {
        # what does not change the trained student is left out: the resume-free keys, the paths
        "config": config_hash(dc, exclude=(*RESUME_FREE, "out", "data.shards")),
        "shardset_sha256": sha256_file(shards / "shardset.json"),
        "teacher": ctx.teacher_ident["id"],
    }
    out = ctx.cache / "runs" / f"{row}-{_hash(key)}"
    run_cfg = dataclasses.replace(
        dc,
        out=str(out),
        data=dataclasses.replace(dc.data, shards=str(shards)),
        log=dataclasses.replace(dc.log, progress=True),
    )
    done = out / "student" / "result.json"
    student_dir = out / "student" / "student"
    if done.is_file() and (student_dir / "model.json").is_file() and read_json(done).get("steps") == dc.train.steps:
        return student_dir, True
    res = distill(run_cfg)
    return Path(res.student_dir), False


def _dfmc_row(ctx: _Ctx) -> tuple[Path, bool]:

    b, d = ctx.budget, ctx.cfg.dfmc
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
        "budget": [b.steps, b.batch, b.patch, b.seed],
    }
    out = ctx.cache / "dfmc" / f"dfmc-{_hash(key)}"
    ctx.sources["dfmc"] = out
    if (out / "student" / "model.json").is_file() and (out / "dfmc.json").is_file():
        return out / "student", True
    student_dir = train_dfmc(
        ctx.teacher.float(), ctx.student_spec, b.steps, b.batch, b.patch, b.seed, out, config=dcfg, device=ctx.device
    )
    return student_dir, False


# ---------------------------------------------------------------------------------------
# 5. evaluation (cached per model and test set)


@dataclass
class _TestSet:
    """The paired test images of every weather (loaded once)."""

    weathers: list[str]
    images: dict[str, list[tuple[str, np.ndarray, np.ndarray]]]  # weather -> [(id, input, target)] uint8 HWC
    manifests: dict[str, str]
    manifest_sha256: dict[str, str]
    tile: int = 0  # teacher tiling on these images (0 = whole images)
    tile_overlap: int = 32


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
        recs = sorted(load_manifest(path), key=lambda r: r.id)
        if budget.eval_images:
            recs = recs[: budget.eval_images]
        pairs = []
        for r in recs:
            inp, tgt = open_pair(src.roots[weather], r)
            pairs.append((r.id, np.asarray(inp, dtype=np.uint8), np.asarray(tgt, dtype=np.uint8)))
        images[weather] = pairs
        shas[weather] = sha256_file(path)
    if not images:
        raise D4IRError(f"test manifests {manifests}: none exists; the table needs paired test sets (`eval.manifests`)")
    order = [w for w in WEATHERS if w in images] + sorted(w for w in images if w not in WEATHERS)
    return _TestSet(order, images, {w: manifests[w] for w in order}, shas, src.tile, src.tile_overlap)


def _tensor(img: np.ndarray, device: Any) -> Any:
    import torch

    return (
        torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].to(device).float() / 255.0
    )  # (1, 3, H, W)


def _run_model(model: Any, img: np.ndarray, device: Any) -> np.ndarray:
    """One image (H, W, 3) uint8 through a restoration model -> (H, W, 3) uint8 (clamped, rounded: as saved)."""
    import torch

    with torch.no_grad():
        y = model(_tensor(img, device)).float().clamp(0, 1)  # (1, 3, H, W)
    return (y[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def _evaluate(ctx: _Ctx, name: str, model_key: str, model: Any | None, tests: _TestSet) -> tuple[dict, bool]:
    """Per-weather mean PSNR / SSIM (Y and RGB, evaluate's pyiqa metrics) of ``model``; None = the input.

    Scored by ``evaluate.score_pairs``; cached under ``cache/eval`` by (model weights, test manifests, image count).
    """

    key = {"model": model_key, "tests": tests.manifest_sha256, "n": ctx.budget.eval_images, "metrics": FR_METRICS}
    path = ctx.cache / "eval" / f"{name}-{_hash(key)}.json"
    if path.is_file():
        return read_json(path)["metrics"], True
    if ctx.metrics is None:
        ctx.metrics = build_fr_metrics(ctx.device)
    metrics: dict[str, dict[str, float]] = {}
    for w in tests.weathers:
        scored = [sp.scores[name] for sp in score_pairs({name: model}, tests.images[w], ctx.metrics, device=ctx.device)]
        metrics[w] = {c: float(np.mean([s[c] for s in scored])) for c in ctx.metrics}
        metrics[w]["images"] = len(scored)
    atomic_write_json(path, {"key": key, "metrics": metrics})
    return metrics, False


def _average(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over weathers of each metric column."""
    if not metrics:
        return {}
    cols = [c for c in next(iter(metrics.values())) if c != "images"]
    return {c: float(np.mean([v[c] for v in metrics.values()])) for c in cols}


# ---------------------------------------------------------------------------------------
# the stage


SOURCES = {
    "data_kd": lambda ctx: _pack_source(ctx, "data_kd"),
    "web": lambda ctx: _pack_source(ctx, "web"),
    "d4ir": _d4ir_source,
    "sd_text": _sd_text_source,
    "noise": _noise_source,
}


def compare(cfg: CompareConfig, quick: bool = False) -> CompareResult:
    """Distil and evaluate one student per input source; write the table, JSON and figures."""

    t_start = time.perf_counter()
    if cfg.runtime.threads:
        import torch

        torch.set_num_threads(cfg.runtime.threads)
    budget = cfg.quick if quick else cfg.budget
    out = Path(cfg.output.dir)
    # 1. the other stages' configs under this table's teacher, student and budget
    distill_cfg = _distill_config(cfg, budget)
    try:
        synth_cfg = _load_stage(SynthesizeConfig, cfg.stages.synthesize, "synthesize", cfg)
        if cfg.sd.model:
            synth_cfg = dataclasses.replace(synth_cfg, sd=dataclasses.replace(synth_cfg.sd, model=cfg.sd.model))
    except D4IRError as e:
        logger.warning("compare: no synthesize config (%s); the D4IR and SD + text rows will be skipped", e)
        synth_cfg = None
    student_spec = {"name": distill_cfg.student.name, "kwargs": dict(distill_cfg.student.kwargs)}
    ctx = _Ctx(
        cfg=cfg,
        budget=budget,
        quick=quick,
        out=out,
        cache=out / "cache",
        synth_cfg=synth_cfg,
        distill_cfg=distill_cfg,
        teacher_ident={},
        student_spec=student_spec,
        device=pick_device(cfg.runtime.device),
    )
    # 2. upstream inputs (demo), teacher and test sets
    _prepare(ctx)
    ctx.teacher_ident = teacher_identity(distill_cfg.teacher)
    teacher, tdtype = load_teacher(distill_cfg.teacher, ctx.device)
    ctx.teacher = teacher
    tests = _load_testset(cfg, budget)
    tcfg = dataclasses.replace(distill_cfg.teacher, tile=tests.tile, tile_overlap=tests.tile_overlap)

    def teacher_fn(x: Any) -> Any:  # (1, 3, H, W) -> (1, 3, H, W), tiled above `tile` px
        return teacher_forward(teacher, x, tdtype, tcfg)

    student_params = count_params(build_model(student_spec["name"], **student_spec["kwargs"]))
    teacher_params = count_params(teacher)

    # 3. reference rows, then one student per source
    results: list[RowResult] = []
    models_for_figure: list[tuple[str, Any]] = []
    teacher_key = f"{ctx.teacher_ident['id']}-tile{tests.tile}-{tests.tile_overlap}"
    for name, model, key in (("input", None, "identity"), ("teacher", teacher_fn, teacher_key)):
        t0 = time.perf_counter()
        metrics, cached = _evaluate(ctx, name, key, model, tests)
        results.append(
            RowResult(
                row=name,
                title=ROW_TITLES[name],
                status="ok",
                metrics=metrics,
                average=_average(metrics),
                params=teacher_params if model is not None else None,
                seconds={"eval": 0.0 if cached else round(time.perf_counter() - t0, 2)},
                cached={"eval": cached},
            )
        )
    models_for_figure.append(("teacher", teacher_fn))
    for row in cfg.rows:
        r = RowResult(row=row, title=ROW_TITLES[row], status="ok")
        try:
            t0 = time.perf_counter()
            if row == "dfmc":
                student_dir, cached = _dfmc_row(ctx)
                r.seconds["source+distill"] = 0.0 if cached else round(time.perf_counter() - t0, 2)
                r.cached["distill"] = cached
            else:
                shards = SOURCES[row](ctx)
                ctx.sources[row] = shards
                r.shards = str(shards)
                r.samples = int(read_json(shards / "shardset.json")["num_samples"])
                r.seconds["source"] = round(time.perf_counter() - t0, 2)
                t1 = time.perf_counter()
                student_dir, cached = _distill_row(ctx, row, shards)
                r.seconds["distill"] = 0.0 if cached else round(time.perf_counter() - t1, 2)
                r.cached["distill"] = cached
        except SkipRow as e:
            r.status, r.reason = "skipped", str(e)
            logger.warning("compare: row %r skipped: %s", row, e)
            results.append(r)
            continue
        student = load_model(student_dir, device=ctx.device)
        t2 = time.perf_counter()
        r.metrics, cached = _evaluate(ctx, row, sha256_file(Path(student_dir) / "model.safetensors"), student, tests)
        r.seconds["eval"] = 0.0 if cached else round(time.perf_counter() - t2, 2)
        r.cached["eval"] = cached
        r.average = _average(r.metrics)
        r.params = count_params(student)
        r.student_dir = str(student_dir)
        results.append(r)
        models_for_figure.append((ROW_TITLES[row].split(" (")[0], student))

    # 4. outputs
    header = {
        "teacher": {**teacher_description(ctx.teacher_ident), "params": teacher_params},
        "student": {"spec": student_spec, "params": student_params, "ratio": student_params / max(1, teacher_params)},
        "sd": sd_description(synth_cfg),
        "budget": dataclasses.asdict(budget),
        "quick": quick,
        "y_channel": cfg.eval.y_channel,
        "test_images": {w: len(tests.images[w]) for w in tests.weathers},
        "test_manifests": tests.manifests,
    }
    markdown = format_table(header, results, tests.weathers)
    out.mkdir(parents=True, exist_ok=True)
    table_md = atomic_write_text(out / "table.md", markdown)
    figures = {}
    fig = _inputs_figure(ctx, out / "inputs.png")
    if fig is not None:
        figures["inputs"] = fig
    figures["restorations"] = _restorations_figure(ctx, tests, models_for_figure, out / "restorations.png")
    seconds = round(time.perf_counter() - t_start, 2)
    table_json = atomic_write_json(
        out / "table.json",
        {
            "header": header,
            "weathers": tests.weathers,
            "rows": [dataclasses.asdict(r) for r in results],
            "figures": {k: str(v) for k, v in figures.items()},
            "seconds": seconds,
            "config": config_to_dict(cfg),
        },
    )
    return CompareResult(out, table_md, table_json, figures, results, header, markdown, seconds)


@stage_command("compare", CompareConfig)
@click.option("--quick", is_flag=True, help="Use the [quick] budget (the whole demo table on 2 CPU cores in minutes).")
def compare_command(cfg: CompareConfig, quick: bool) -> None:
    """The paper's comparison: data KD, web data, D4IR, SD + text, noise and GAN rows, one student each."""
    res = compare(cfg, quick=quick)
    click.echo(res.markdown)
    click.echo(f"table: {res.table_md}  json: {res.table_json}  figures: {', '.join(map(str, res.figures.values()))}")
    click.echo(f"({res.seconds:.0f} s)")


def _shard_samples(shards: Path, n: int, *, keys: list[str] | None = None) -> dict[str, dict[str, bytes]]:
    """Up to ``n`` samples (key -> {ext: bytes}) of a shard set, in manifest order, or the given keys."""

    _, listed = read_listing(shards / SHARDSET_NAME, "d4ir-shardset")
    out: dict[str, dict[str, bytes]] = {}
    for s in listed:
        for k, files in read_shard(s.path).items():
            if keys is None or k in keys:
                out[k] = files
            if keys is None and len(out) >= n:
                return out
        if keys is not None and len(out) == len(keys):
            break
    return out


def _decode(data: bytes) -> np.ndarray:

    return np.asarray(decode_rgb(data)[0], dtype=np.uint8)


def _image_of(files: dict[str, bytes], prefix: str = "degraded.") -> np.ndarray | None:
    ext = next((e for e in files if e.startswith(prefix)), None)
    return _decode(files[ext]) if ext else None


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


def _inputs_figure(ctx: _Ctx, path: Path) -> Path | None:
    """A grid of training inputs per source; D4IR and SD + text share source images (same keys)."""

    n = ctx.cfg.eval.figure_samples
    rows, labels = [], []
    d4, sdt = ctx.sources.get("d4ir"), ctx.sources.get("sd_text")
    keys: list[str] | None = None
    col_labels = None
    if d4 is not None:
        first = _shard_samples(d4, n)
        keys = list(first)
        col_labels = [str(json.loads(f["json"]).get("weather")) for f in first.values()]  # D4IR's weather per column
        clean = [_image_of(f, "clean.") for f in first.values()]
        if any(c is None for c in clean):  # not kept in the shards: cut again from the web-clean image
            clean = [_clean_crop(ctx, json.loads(f["json"])) for f in first.values()]
        rows.append(clean)
        labels.append("clean source")
    for row in ("sd_text", "d4ir"):
        src = ctx.sources.get(row)
        if src is None:
            continue
        got = _shard_samples(src, n, keys=keys) if keys and src == sdt else _shard_samples(src, n)
        ordered = [got[k] for k in keys if k in got] if keys and src == sdt else list(got.values())
        rows.append([_image_of(f) for f in ordered])
        labels.append(ROW_TITLES[row].split(" (")[0])
    if ctx.sources.get("dfmc") is not None and (ctx.sources["dfmc"] / "generator.json").is_file():
        rows.append(generator_samples(ctx.sources["dfmc"], n, seed=ctx.budget.seed))
        labels.append("GAN (DFMC)")
    for row in ("noise", "web", "data_kd"):
        src = ctx.sources.get(row)
        if src is not None:
            rows.append([_image_of(f) for f in _shard_samples(src, n).values()])
            labels.append(ROW_TITLES[row].split(" (")[0])
    if not rows:
        return None
    cell = max(64, min(160, ctx.synth_cfg.data.resolution if ctx.synth_cfg is not None else 96))
    save_png(path, image_grid(rows, cell=cell, labels=labels, col_labels=col_labels))
    return path


def _restorations_figure(ctx: _Ctx, tests: _TestSet, models: list[tuple[str, Any]], path: Path) -> Path:
    """A grid: columns are test images (per weather), rows are input, target, teacher and each row's student."""

    picks = [(w, item) for w in tests.weathers for item in tests.images[w][: ctx.cfg.eval.figure_images]]
    rows = [[inp for _, (_, inp, _) in picks], [tgt for _, (_, _, tgt) in picks]]
    labels = ["input", "target"]
    for name, model in models:
        rows.append([_run_model(model, inp, ctx.device) for _, (_, inp, _) in picks])
        labels.append(name)
    cols = [w for w, _ in picks]
    save_png(path, image_grid(rows, cell=128, labels=labels, col_labels=cols))
    return path
