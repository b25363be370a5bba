"""``make smoke-sd15``: the ``sd15`` profile's real commands at real size, on random SD 1.5-shaped weights.

Nothing before this ran 768-wide tokens, 77-token contexts, 64x64 latents, 512 px
shards or a full-size tiled teacher together. This driver runs each stage as a child
process of the real ``d4ir`` entry point (``python -m d4ir_pipeline.cli ...``) with
``--profile sd15`` and ``--set`` overrides for small step counts:

    sd15-shaped folder -> demo data upscaled to 512 px + manifests -> full-size Restormer
    (random) -> train-dpa (CLIP ViT-L/14 encoder) -> prompt-bank -> synthesize -> label
    (tiled) -> distill (nafnet_s) -> evaluate -> export (ONNX / int8) -> restore (with the ONNX model)

and writes ``<work>/report.json``: per stage the wall time, the child's peak RSS and CPU
time (``os.wait4`` rusage of that child), and the output sizes (shard bytes per 512 px
sample, prompt-bank bytes). Its numbers say what real-size runs cost in time and memory;
the images are meaningless (random weights). Rerunning resumes: every stage resumes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d4ir_pipeline.common.io import atomic_write_json, read_json
from d4ir_pipeline.common.runtime import setup_logging
from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.data.manifests import load_manifest
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.sd import check_sd_source, text_hidden_size

logger = logging.getLogger(__name__)

STUDENT = "nafnet_s"  # the student the smoke distills, exports and restores with

__all__ = [
    "SmokeSettings",
    "StageRun",
    "stage_overrides",
    "stage_commands",
    "deploy_commands",
    "resolve_configs",
    "prepare_data",
    "run_child",
    "run_smoke",
    "main",
]

WEATHERS = ("rain", "haze", "snow")
# stage command -> (module:config class, stages/sd15/<name>.toml). [design] This driver stays a
# small process and imports no stage module (they import torch): on Linux a child's ru_maxrss
# starts at its parent's resident size (exec keeps the pre-exec high-water mark), so a 700 MB
# driver would report every stage as >= 700 MB. Work that needs torch runs in a child too.
CONFIGS = {
    "train-dpa": ("d4ir_pipeline.stage1.dpa.config:DPAConfig", "dpa"),
    "prompt-bank": ("d4ir_pipeline.stage1.prompt_bank:BankConfig", "prompt-bank"),
    "synthesize": ("d4ir_pipeline.stage1.synthesize:SynthesizeConfig", "synthesize"),
    "label": ("d4ir_pipeline.stage2.config:DistillConfig", "distill"),
    "distill": ("d4ir_pipeline.stage2.config:DistillConfig", "distill"),
    "evaluate": ("d4ir_pipeline.stage2.evaluate:EvalConfig", "evaluate"),
}


@dataclass(frozen=True)
class SmokeSettings:
    """What the smoke runs; the defaults fit ~15 minutes on 2 idle CPU cores."""

    work: str = "runs/smoke-sd15"
    device: str = "cpu"  # cpu | cuda (gpu-check)
    dtype: str = "float32"  # SD / teacher weights on CUDA (gpu-check: float16); the CPU uses float32
    attention: str = "auto"  # auto: xformers when installed on CUDA, else SDPA (logged per stage)
    size: int = 512  # every demo image is upscaled to this square side (SD 1.5's resolution)
    degraded_per_weather: int = 2  # web-degraded images per weather: DPA training + prompt bank
    clean_images: int = 2  # web-clean images: one synthesised 512 px sample each
    test_per_weather: int = 1  # paired test images per weather: DPA report + evaluation
    dpa_steps: int = 2  # each: CLIP on 2x2 crops + SD 1.5 UNet forward/backward on one 512 px latent
    dpa_batch: int = 2
    strength: float = 0.1  # img2img strength: round(0.1 * 10) = 1 UNet step (x2 with CFG) per sample
    synth_steps: int = 10
    synth_batch: int = 2
    shard_size: int = 1  # one sample per shard: several shards from a few samples
    label_tile: int = 288  # tiled teacher labels: 2x2 tiles of 288 px (32 px overlap) per 512 px sample
    distill_steps: int = 2
    distill_batch: int = 2
    distill_patch: int = 256
    seed: int = 0
    python: str = sys.executable

    @property
    def root(self) -> Path:
        return Path(self.work)


@dataclass
class StageRun:
    """One child process: its command, wall time, exit status and rusage."""

    name: str
    argv: list[str]
    log: str
    returncode: int | None = None
    wall_s: float | None = None
    peak_rss_mib: float | None = None  # ru_maxrss of the child (KiB on Linux)
    user_s: float | None = None
    sys_s: float | None = None
    attention: list[str] = field(default_factory=list)  # "attention backend: ..." lines of its log


# ------------------------------------------------------------------ commands
def _paths(s: SmokeSettings) -> dict[str, Path]:
    r = s.root
    return {
        "sd": r / "sd15",
        "clip": r / "sd15" / "image_encoder",
        "demo": r / "demo-data",
        "data": r / "data",
        "manifests": r / "data" / "manifests",
        "teacher": r / "teacher",
        "logs": r / "logs",
    }


def _q(value) -> str:
    """A TOML value for ``--set``: strings and paths quoted, tables / lists as JSON (valid TOML here)."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_q(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def stage_overrides(s: SmokeSettings) -> dict[str, list[str]]:
    """The ``--set`` overrides of every stage: the generated folder, the 512 px data, small counts."""
    p = _paths(s)
    m, d = p["manifests"], p["data"]
    on_cuda = s.device.startswith("cuda")
    half = s.dtype if on_cuda else "float32"
    dev = s.device
    teacher = [f"teacher.checkpoint={_q(p['teacher'])}", 'teacher.arch=""', f"teacher.dtype={_q(half)}"]
    return {
        "train-dpa": [
            f"sd.model={_q(p['sd'])}",
            f"sd.attention={_q(s.attention)}",
            f"sd.dtype={_q(half)}",
            f"encoder.clip_model={_q(p['clip'])}",
            f"data.manifest={_q(m / 'web-degraded.jsonl')}",
            f"data.root={_q(d / 'web-degraded')}",
            f"train.steps={s.dpa_steps}",
            f"train.batch_size={s.dpa_batch}",
            "train.warmup_steps=0",
            f"runtime.device={_q(dev)}",
            f"train.seed={s.seed}",
            "loss.diffusion_batch=1",
            "loss.cache_latents=false",  # one 512 px VAE encode per step instead of one per image up front
            f"report.test_manifests={_q([str(m / 'test.jsonl')])}",
            f"report.test_root={_q(d / 'test')}",
            "report.knn_k=1",
        ],
        "prompt-bank": [
            f"bank.manifest={_q(m / 'web-degraded.jsonl')}",
            f"bank.root={_q(d / 'web-degraded')}",
            f"runtime.device={_q(dev)}",
        ],
        "synthesize": [
            f"sd.model={_q(p['sd'])}",
            f"data.manifest={_q(m / 'web-clean.jsonl')}",
            f"data.root={_q(d / 'web-clean')}",
            f"ccd.strength={s.strength}",
            f"ccd.steps={s.synth_steps}",
            f"ccd.seed={s.seed}",
            f"output.shard_size={s.shard_size}",
            f"runtime.device={_q(dev)}",
            f"runtime.dtype={_q(half)}",
            f"runtime.attention={_q(s.attention)}",
            f"runtime.batch_size={s.synth_batch}",
            "runtime.workers=2",
        ],
        "label": [*teacher, f"teacher.tile={s.label_tile}", "labels.batch_size=1"],
        "distill": [
            *teacher,
            f"teacher.tile={s.label_tile}",  # the label cache is keyed by the teacher incl. its tiling
            f"student.name={_q(STUDENT)}",
            f"train.steps={s.distill_steps}",
            "train.warmup_steps=0",
            f"train.ckpt_every={s.distill_steps}",
            f"runtime.device={_q(dev)}",
            f"data.batch_size={s.distill_batch}",
            f"data.patch={s.distill_patch}",
            "data.num_workers=1",
            "data.shuffle_buffer=4",
            "data.shuffle_initial=1",
            "data.error_min_samples=1",
            "log.every=1",
            "log.progress=false",
            "val.samples=1",
        ],
        "evaluate": [
            *teacher,
            f"runtime.device={_q(dev)}",
            f"data.manifests={_q({w: str(m / f'test-{w}.jsonl') for w in WEATHERS})}",
            f"data.roots={_q({w: str(d / 'test' / w) for w in WEATHERS})}",
            f"data.root={_q(d / 'test')}",
            f"data.max_images={s.test_per_weather}",
            "metrics.no_reference=[]",
            "cost.repeats=1",
            "report.contact_per_weather=1",
        ],
    }


def stage_commands(s: SmokeSettings) -> list[tuple[str, list[str]]]:
    """(name, argv) of the pipeline stages, each the real CLI with ``--profile sd15``."""
    cli = [s.python, "-m", "d4ir_pipeline.cli"]
    common = ["--profile", "sd15", "--work-dir", str(s.root)]
    over = stage_overrides(s)
    names = {"train-dpa": "dpa", "prompt-bank": "prompt-bank", "synthesize": "synthesize", "label": "labels",
             "distill": "distill", "evaluate": "evaluate"}  # fmt: skip
    out = []
    for command, name in names.items():
        sets = [a for kv in over[command] for a in ("--set", kv)]
        out.append((name, [*cli, command, *common, *sets]))
    return out


def deploy_commands(s: SmokeSettings) -> list[tuple[str, list[str]]]:
    """(name, argv) of the deployment steps on the distilled student, each the real CLI.

    ``d4ir export`` (ONNX fp32 / fp16 / int8 calibrated on the smoke's 512 px shards, pt2,
    each checked against PyTorch; ``--overwrite`` so a rerun redoes it) and ``d4ir restore``
    of the 512 px test inputs with the exported ONNX model (resumes by itself). On CUDA the
    restore asks for ``auto``: ONNX Runtime's CUDA provider when installed, its CPU one otherwise.
    """
    p = _paths(s)
    cli = [s.python, "-m", "d4ir_pipeline.cli"]
    # distill.output.dir is the profile's {work}/distill; the folder name is student_tag(name) (a plain name)
    student, export = s.root / "distill" / STUDENT / "student", s.root / "export"
    test = [str(p["manifests"] / "test.jsonl"), "--root", str(p["data"] / "test")]
    device = "auto" if s.device.startswith("cuda") else s.device
    restore = ["--model", str(export / "model.onnx"), "--out", str(s.root / "restored"), "--device", device]
    return [
        ("export", [*cli, "export", str(student), "--out", str(export), "--overwrite"]),
        ("restore", [*cli, "restore", *test, *restore, "--overwrite"]),
    ]


# ------------------------------------------------------------------ config resolution (no model runs)
def resolve_configs(s: SmokeSettings) -> dict:
    """Load every stage's ``sd15`` config with the smoke's overrides and check it against the folder.

    Reads configs only (UNet / text / vision / tokenizer), so it runs in seconds, also on a
    folder written with ``weights=False``; raises :class:`D4IRError` naming the key.
    """
    from transformers import CLIPTokenizer, CLIPVisionConfig

    over = stage_overrides(s)
    cfgs = {}
    for cmd, (target, toml) in CONFIGS.items():
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        cfgs[cmd] = load_stage_config(cls, toml, profile="sd15", overrides=over[cmd], work_dir=s.work)
    dpa, synth = cfgs["train-dpa"], cfgs["synthesize"]
    # 1. the SD folder: D from the UNet, the native resolution from UNet and VAE
    for key, model in (("train-dpa: sd.model", dpa.sd.model), ("synthesize: sd.model", synth.sd.model)):
        check_sd_source(model)
        if Path(model) != Path(dpa.sd.model):
            raise D4IRError(f"`{key}` = {model!r} differs from the DPA's SD {dpa.sd.model!r}")
    sd = Path(dpa.sd.model)
    d = text_hidden_size(str(sd))
    unet = read_json(sd / "unet" / "config.json")
    vae = read_json(sd / "vae" / "config.json")
    native = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    for key, res in (("train-dpa: sd.resolution", dpa.sd.resolution or native),
                     ("synthesize: data.resolution", synth.data.resolution)):  # fmt: skip
        if res != native:
            raise D4IRError(f"`{key}` = {res}: the UNet's native resolution is {native} px")
    # 2. the text side: 77-token context, the real vocabulary, K <= 77
    text = read_json(sd / "text_encoder" / "config.json")
    tok = CLIPTokenizer.from_pretrained(str(sd / "tokenizer"))
    if tok.model_max_length != text["max_position_embeddings"]:
        raise D4IRError(
            f"{sd}/tokenizer: model_max_length {tok.model_max_length} != the text encoder's "
            f"{text['max_position_embeddings']} positions"
        )
    if len(tok) != text["vocab_size"]:
        raise D4IRError(f"{sd}/tokenizer: {len(tok)} tokens, the text encoder embeds {text['vocab_size']}")
    if dpa.adapter.tokens > tok.model_max_length:
        raise D4IRError(f"`adapter.tokens` = {dpa.adapter.tokens} exceeds the {tok.model_max_length}-token context")
    # 3. the DPA's image tower
    if dpa.encoder.kind != "clip":
        raise D4IRError(f"`encoder.kind` = {dpa.encoder.kind!r}: the sd15 profile trains the CLIP encoder")
    vis = CLIPVisionConfig.from_pretrained(dpa.encoder.clip_model)
    feature = vis.projection_dim if dpa.encoder.clip_projection else vis.hidden_size
    # 4. the synthesis scheduler swap keeps SD's config
    import diffusers

    sched_cls = getattr(diffusers, synth.sd.scheduler, None)
    if sched_cls is None:
        raise D4IRError(f"`sd.scheduler` = {synth.sd.scheduler!r}: not a diffusers scheduler")
    sched = sched_cls.from_config(sched_cls.load_config(sd / "scheduler"))
    return {
        "sd_model": str(sd),
        "prompt_width": d,
        "resolution": native,
        "latent": int(unet["sample_size"]),
        "context": tok.model_max_length,
        "vocab": len(tok),
        "dpa_tokens": dpa.adapter.tokens,
        "clip_image_size": vis.image_size,
        "clip_feature": feature,
        "scheduler": type(sched).__name__,
        "teacher": cfgs["label"].teacher.checkpoint,
        "teacher_tile": cfgs["label"].teacher.tile,
        "eval_tile": cfgs["evaluate"].teacher.tile,
        "student": cfgs["distill"].student.name,
    }


# ------------------------------------------------------------------ data and teacher
def _upscale(src: Path, dst: Path, size: int) -> None:
    from PIL import Image

    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, format="PNG")


def prepare_data(s: SmokeSettings, demo_root: Path) -> dict[str, int]:
    """512 px copies of a few demo images in the folder layouts ``d4ir manifest build`` reads."""
    p = _paths(s)
    data = p["data"]
    counts = {"web-degraded": 0, "web-clean": 0, "test": 0}
    deg = load_manifest(demo_root / "manifests" / "web-degraded.jsonl")
    for w in WEATHERS:
        recs = [r for r in deg if r.weather == w][: s.degraded_per_weather]
        if len(recs) < s.degraded_per_weather:
            raise D4IRError(f"the demo data has only {len(recs)} web-degraded {w} images")
        for r in recs:
            _upscale(demo_root / r.path, data / "web-degraded" / w / Path(r.path).name, s.size)
            counts["web-degraded"] += 1
    for r in load_manifest(demo_root / "manifests" / "web-clean.jsonl")[: s.clean_images]:
        _upscale(demo_root / r.path, data / "web-clean" / Path(r.path).name, s.size)
        counts["web-clean"] += 1
    for w in WEATHERS:
        for r in load_manifest(demo_root / "manifests" / f"test-{w}.jsonl")[: s.test_per_weather]:
            name = Path(r.path).name
            _upscale(demo_root / r.path, data / "test" / w / "input" / name, s.size)
            _upscale(demo_root / r.target, data / "test" / w / "target" / name, s.size)
            counts["test"] += 1
    return counts


def manifest_commands(s: SmokeSettings) -> list[tuple[str, list[str]]]:
    """``d4ir manifest build`` of each 512 px folder (per weather for evaluation, joined for the DPA report)."""
    p = _paths(s)
    cli = [s.python, "-m", "d4ir_pipeline.cli", "manifest", "build"]
    d, m = p["data"], p["manifests"]
    cmds = [
        [*cli, str(d / "web-degraded"), "--out", str(m / "web-degraded.jsonl"), "--split", "web-degraded", "--strict"],
        [*cli, str(d / "web-clean"), "--out", str(m / "web-clean.jsonl"), "--split", "web-clean", "--strict"],
        [*cli, str(d / "test"), "--out", str(m / "test.jsonl"), "--split", "test", "--strict"],
    ]
    cmds += [[*cli, str(d / "test" / w), "--out", str(m / f"test-{w}.jsonl"), "--split", "test", "--strict"]
             for w in WEATHERS]  # fmt: skip
    return [(f"manifest-{Path(c[5]).name}", c) for c in cmds]


def write_random_teacher(out: Path, seed: int) -> dict:
    """A full-size Restormer (26M parameters) with random weights, as a save_model folder."""
    import torch

    # lazy on purpose: the driver must not import torch (a child's peak RSS starts at its parent's)
    from d4ir_pipeline.models import build_model, save_model

    torch.manual_seed(seed)
    model = build_model("restormer")
    save_model(model, out, extra={"note": "random weights (smoke-sd15): outputs are meaningless"})
    return {"arch": "restormer", "params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------ children
def run_child(name: str, argv: list[str], log_dir: str | Path, env: dict | None = None) -> StageRun:
    """Run one command as a child process; its own rusage (``os.wait4``) gives peak RSS and CPU time."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    run = StageRun(name=name, argv=argv, log=str(log))
    logger.info("$ %s", shlex.join(argv))
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    run.wall_s = round(time.perf_counter() - t0, 2)
    run.returncode = proc.returncode
    run.peak_rss_mib = round(usage.ru_maxrss / 1024, 1)
    run.user_s, run.sys_s = round(usage.ru_utime, 2), round(usage.ru_stime, 2)
    text = log.read_text(errors="replace")
    run.attention = sorted(set(re.findall(r"attention backend: ([^\n]+)", text)))
    return run


def _tree_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file()) if path.exists() else 0


def output_sizes(s: SmokeSettings) -> dict:
    """Bytes of what the stages wrote: shards per 512 px sample, prompt bank, labels, checkpoints."""
    r = s.root
    sizes: dict = {}
    shardset = r / "shards" / "shardset.json"
    if shardset.is_file():
        doc = read_json(shardset)
        n = int(doc.get("num_samples", 0))
        tar_bytes = sum(int(x["bytes"]) for x in doc["shards"])
        sizes["shards"] = {"samples": n, "shards": len(doc["shards"]), "bytes": tar_bytes,
                           "bytes_per_sample": round(tar_bytes / n) if n else None}  # fmt: skip
    sizes["prompt_bank_bytes"] = _tree_bytes(r / "bank")
    bank = r / "bank" / "bank.json"
    if bank.is_file():
        meta = read_json(bank)
        sizes["prompt_bank"] = {k: meta.get(k) for k in ("num_rows", "K", "D", "weathers")}
    sizes["labels_bytes"] = _tree_bytes(r / "shards" / "labels")
    sizes["dpa_bytes"] = _tree_bytes(r / "dpa")
    sizes["dpa_weights_bytes"] = _tree_bytes(r / "dpa", "dpa.safetensors")
    sizes["distill_bytes"] = _tree_bytes(r / "distill")
    sizes["sd15_folder_bytes"] = _tree_bytes(r / "sd15")
    sizes["teacher_bytes"] = _tree_bytes(r / "teacher")
    sizes["export_bytes"] = {f.name: f.stat().st_size for f in sorted((r / "export").glob("model*")) if f.is_file()}
    sizes["restored_images"] = len(list((r / "restored").glob("**/*.png")))
    return sizes


def run_smoke(s: SmokeSettings) -> dict:
    """Every step in order; stops at the first failing child (its log is named). Returns the report."""
    p = _paths(s)
    s.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cli = [s.python, "-m", "d4ir_pipeline.cli"]
    runs: list[StageRun] = []
    report: dict = {
        "kind": "d4ir-smoke-sd15",
        "driver_peak_rss_mib": None,  # the floor of every child's peak RSS (see CONFIGS)
        "settings": asdict(s),
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "load_avg_start": os.getloadavg(),
        },
        "note": "random SD 1.5-shaped weights and a random teacher: times, memory and sizes are real, images are not",
    }
    t_start = time.perf_counter()

    def child(name: str, argv: list[str]) -> None:
        run = run_child(name, argv, p["logs"], env)
        runs.append(run)
        report["stages"] = [asdict(x) for x in runs]
        atomic_write_json(s.root / "report.json", report)
        if run.returncode != 0:
            tail = "\n".join(Path(run.log).read_text(errors="replace").splitlines()[-15:])
            raise D4IRError(f"stage {name!r} failed (exit {run.returncode}); log {run.log}:\n{tail}")
        logger.info("%s: %.1f s, peak RSS %.0f MiB", name, run.wall_s, run.peak_rss_mib)

    # 1. the SD 1.5-shaped folder and the demo data (both reused when present)
    child("sd15-shaped", [*cli, "sd15-shaped", str(p["sd"])])
    child("demo-data", [*cli, "demo-data", "--out", str(p["demo"])])
    # 2. 512 px copies, their manifests, the random full-size teacher
    t0 = time.perf_counter()
    report["data"] = prepare_data(s, p["demo"])
    report["data_upscale_s"] = round(time.perf_counter() - t0, 2)
    for name, argv in manifest_commands(s):
        child(name, argv)
    me = [s.python, "-m", "d4ir_pipeline.demo.smoke_sd15", "--work-dir", s.work, "--device", s.device]
    if not (p["teacher"] / "model.json").is_file():
        child("teacher", [*me, "--write-teacher", str(p["teacher"])])
    report["teacher"] = read_json(p["teacher"] / "model.json")["spec"]
    # 3. the configs resolve against the folder before anything heavy runs
    child("resolve-configs", [*me, "--resolve-only", "--out", str(s.root / "resolved.json")])
    report["resolved"] = read_json(s.root / "resolved.json")
    # 4. the pipeline, each stage the real CLI
    for name, argv in stage_commands(s):
        child(name, argv)
    # 5. the student leaves the project: ONNX / int8 export, restore with the exported model
    for name, argv in deploy_commands(s):
        child(name, argv)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["sizes"] = output_sizes(s)
    report["machine"]["load_avg_end"] = os.getloadavg()
    atomic_write_json(s.root / "report.json", report)
    return report


def summary(report: dict) -> str:
    """The printed table: one row per stage, then the sizes."""
    lines = [f"{'stage':<26}{'wall s':>9}{'peak RSS MiB':>14}{'CPU s':>9}  attention"]
    for r in report.get("stages", []):
        cpu = (r["user_s"] or 0) + (r["sys_s"] or 0)
        lines.append(f"{r['name']:<26}{r['wall_s']:>9.1f}{r['peak_rss_mib']:>14.0f}{cpu:>9.1f}  "
                     f"{', '.join(r['attention']) or '-'}")  # fmt: skip
    if "total_s" in report:
        lines.append(f"{'total':<26}{report['total_s']:>9.1f}")
    sz = report.get("sizes", {})
    if "shards" in sz:
        sh = sz["shards"]
        lines.append(f"shards: {sh['samples']} samples in {sh['shards']} tars, {sh['bytes_per_sample']} bytes/sample")
    if "prompt_bank_bytes" in sz:
        lines.append(f"prompt bank: {sz['prompt_bank_bytes']} bytes {sz.get('prompt_bank', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SmokeSettings()
    ap.add_argument("--work-dir", default=defaults.work, help="where everything goes (default %(default)s)")
    ap.add_argument("--device", default=defaults.device, help="cpu | cuda[:N]")
    ap.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float16", "bfloat16"],
                    help="SD and teacher weights on CUDA (the CPU always uses float32)")  # fmt: skip
    ap.add_argument("--attention", default=defaults.attention, choices=["auto", "sdpa", "xformers"])
    ap.add_argument("--clean-images", type=int, default=defaults.clean_images, help="512 px samples synthesised")
    ap.add_argument("--dpa-steps", type=int, default=defaults.dpa_steps)
    ap.add_argument("--distill-steps", type=int, default=defaults.distill_steps)
    ap.add_argument("--resolve-only", action="store_true", help="check the configs against the folder and stop")
    ap.add_argument("--out", default=None, help="with --resolve-only: also write the result here (JSON)")
    ap.add_argument("--write-teacher", metavar="DIR", default=None, help="write the random Restormer to DIR and stop")
    args = ap.parse_args(argv)
    setup_logging()
    if args.device.startswith("cuda") and not (args.write_teacher or args.resolve_only):
        probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"  # in a child: see CONFIGS
        if subprocess.run([sys.executable, "-c", probe], check=False).returncode != 0:
            print(f"error: --device {args.device} but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    for name in ("clean_images", "dpa_steps", "distill_steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1", file=sys.stderr)
            return 2
    s = SmokeSettings(work=args.work_dir, device=args.device, dtype=args.dtype, attention=args.attention,
                      clean_images=args.clean_images, dpa_steps=args.dpa_steps, distill_steps=args.distill_steps)  # fmt: skip
    try:
        if args.write_teacher:
            print(json.dumps(write_random_teacher(Path(args.write_teacher), s.seed)))
            return 0
        if args.resolve_only:
            got = resolve_configs(s)
            if args.out:
                atomic_write_json(args.out, got)
            print(json.dumps(got, indent=2))
            return 0
        report = run_smoke(s)
    except D4IRError as e:
        print(f"error: {e}\nFinished stages are kept; rerun `make smoke-sd15` to continue.", file=sys.stderr)
        return 1
    print("\n== smoke-sd15: done ==")
    print(summary(report))
    print(f"report: {s.root / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
