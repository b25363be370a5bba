"""``d4ir restore``: run a teacher or a student on one image, a folder tree or an image manifest.

    inputs (file / folder / manifest) -> resume check (restore-log.jsonl) -> group by size
      -> decode (bad files: a reason, never a crash) -> plan (memory budget: batch or tiles)
      -> model (PyTorch or ONNX Runtime) -> PNG at the input's relative path (atomic) -> log line

The output folder mirrors the inputs' relative paths with a ``.png`` suffix (two inputs
that would meet, ``a.jpg`` and ``a.png``, keep their suffix: ``a.jpg.png``, ``a.png.png``).
It also holds ``restore-summary.json`` (what was restored, what was skipped and why;
rewritten only when it changes), ``restore-log.jsonl`` (one line per written PNG: what
makes a rerun skip finished work) and, on request, ``restore-sheet.png`` (input | output).
Exit codes: :data:`EXIT_CODES`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import numpy as np
import torch
from PIL import Image

from d4ir_pipeline.common.images import IMAGE_EXTENSIONS, decode_rgb, png_bytes, read_bytes
from d4ir_pipeline.common.io import atomic_write_bytes, sha256_bytes
from d4ir_pipeline.common.runtime import torch_threads
from d4ir_pipeline.config import opt
from d4ir_pipeline.data.manifests import ImageRecord, load_manifest, load_rgb_checked
from d4ir_pipeline.deploy.budget import Plan, plan
from d4ir_pipeline.deploy.options import RawToml, config_from_cli
from d4ir_pipeline.deploy.runner import RUN_DTYPES, ModelConfig, Runner, load_runner
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models.tiling import tiled_forward

__all__ = [
    "EXIT_CODES",
    "SUMMARY_NAME",
    "LOG_NAME",
    "SHEET_NAME",
    "RestoreConfig",
    "RestoreResult",
    "list_inputs",
    "run_model",
    "restore",
    "restore_command",
]

logger = logging.getLogger(__name__)

EXIT_CODES: dict[int, str] = {
    0: "every input is restored (by this run or an earlier one)",
    1: "finished, but some inputs were skipped: the reasons are in restore-summary.json",
    2: "bad arguments, model or output folder (the message says which); nothing new was written",
    130: "interrupted: finished outputs are kept, rerun the same command to resume",
}
SUMMARY_NAME = "restore-summary.json"
LOG_NAME = "restore-log.jsonl"
SHEET_NAME = "restore-sheet.png"
SHEET_HEIGHT = 192


@dataclass(frozen=True)
class RestoreConfig:
    """`d4ir restore`: inputs, model, output folder, memory budget."""

    input: str = opt("", help="an image file, a folder (searched recursively) or an image manifest (.jsonl)")
    root: str = opt("", help="image root of a manifest's relative paths (a manifest input needs it)")
    out: str = opt("", help="output folder (restored PNGs at the inputs' relative paths); not inside the input")
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = opt("auto", help="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    dtype: str = opt(
        "auto", help="'auto': float16 on CUDA where the model allows it, float32 on CPU", choices=RUN_DTYPES
    )
    memory_mb: int = opt(
        2048, help="activation memory budget of one forward (MiB): larger images are tiled, small ones batched", min=16
    )
    tile: int = opt(0, help="fixed tile side (px) for images with a larger side; 0 = from `memory_mb`", min=0)
    tile_overlap: int = opt(32, help="overlap of neighbouring tiles (px); blended with raised-cosine weights", min=0)
    batch_size: int = opt(8, help="most images of one size per forward", min=1)
    threads: int = opt(0, help="CPU threads (torch / ONNX Runtime); 0 = library default", min=0)
    sheet: bool = opt(False, help="also write restore-sheet.png: input | output for the first `sheet_images`")
    sheet_images: int = opt(8, help="images on the sheet", min=1)
    progress: bool = opt(True, help="tqdm progress bar")
    overwrite: bool = opt(False, help="redo outputs that an earlier run wrote with another model")


@dataclass
class RestoreResult:
    """What a restore run did; ``exit_code`` as in :data:`EXIT_CODES`."""

    out_dir: Path
    summary_path: Path
    sheet_path: Path | None
    inputs: int
    restored: int  # outputs present for this model (written now or earlier)
    written: int  # written by this run
    skipped: list[dict]
    not_images: list[str]
    exit_code: int
    seconds: float
    model_seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Item:
    """One input: its relative path (the key), its output path, and where its bytes are."""

    rel: str
    out_rel: str
    path: Path | None = None  # the file (for a manifest record: under the root; read through the record)
    record: ImageRecord | None = None  # a manifest record (opened under the root)


# ---------------------------------------------------------------------------------------
# inputs


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_inputs(cfg: RestoreConfig) -> tuple[list[Item], list[str], Path | None]:
    """(items, relative paths of files that are not images, the folder outputs must stay out of)."""
    src = Path(cfg.input)
    if not cfg.input or not src.exists():
        raise D4IRError(f"`input` = {cfg.input!r}: no such file or folder")
    ignored: list[str] = []
    if src.is_file() and src.suffix.lower() == ".jsonl":
        rels, guard = _manifest_inputs(cfg, src)
    elif src.is_file():
        rels, guard = [(src.name, src, None)], None  # one file: any folder may hold its output
    else:
        (rels, ignored), guard = _folder_inputs(src), src
    # outputs: same relative path, .png; inputs that would meet keep their suffix
    first = {rel: PurePosixPath(rel).with_suffix(".png").as_posix() for rel, _, _ in rels}
    meets = defaultdict(list)
    for rel, o in first.items():
        meets[o].append(rel)
    items = [
        Item(rel, first[rel] if len(meets[first[rel]]) == 1 else rel + ".png", path, rec) for rel, path, rec in rels
    ]
    return sorted(items, key=lambda i: i.rel), sorted(ignored), guard


_Input = tuple[str, Path | None, ImageRecord | None]  # (relative path, file, manifest record)


def _manifest_inputs(cfg: RestoreConfig, src: Path) -> tuple[list[_Input], Path]:
    """One input per file a manifest names (two records of one file: one output), under ``cfg.root``."""
    if not cfg.root:
        raise D4IRError(f"`input` = {cfg.input!r} is a manifest: give `root`, the folder its paths are relative to")
    root = Path(cfg.root)
    if not root.is_dir():
        raise D4IRError(f"`root` = {cfg.root!r} is not a folder")
    rels: dict[str, _Input] = {}
    for rec in load_manifest(src):
        rel = rec.path if rec.path is not None else rec.id
        rels.setdefault(rel, (rel, root / rec.path if rec.path is not None else None, rec))
    return list(rels.values()), root


def _folder_inputs(src: Path) -> tuple[list[_Input], list[str]]:
    """The images of a folder tree (hidden files and folders left out) and the other files' relative paths."""
    rels: list[_Input] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for full in (Path(dirpath) / name for name in sorted(filenames) if not _hidden(name)):
            rel = full.relative_to(src).as_posix()
            if full.suffix.lower() in IMAGE_EXTENSIONS:
                rels.append((rel, full, None))
            else:
                ignored.append(rel)
    return rels, ignored


def check_out_dir(out: Path, guard: Path | None, src: Path) -> None:
    """Refuse an output folder equal to or inside the input (a rerun would read its own outputs)."""
    o = out.resolve()
    if guard is not None:
        g = guard.resolve()
        if o == g or g in o.parents:
            raise D4IRError(
                f"`out` = {str(out)!r} is {'the input folder' if o == g else 'inside the input folder'} "
                f"{str(guard)!r}: a rerun would take the outputs for inputs; choose a folder outside it"
            )
    elif o == src.resolve():
        raise D4IRError(f"`out` = {str(out)!r} is the input file itself")


def _header_size(item: Item) -> tuple[int, int] | None:
    """(H, W) from the header or the record (before EXIF rotation), for grouping; None if unreadable."""
    if item.record is not None:
        return item.record.height, item.record.width
    try:
        with Image.open(item.path) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001  decoded (and its reason reported) later
        return None


# ---------------------------------------------------------------------------------------
# resume state


def _read_log(path: Path) -> dict[str, dict]:
    """output relative path -> its last log entry (a torn last line from a kill is ignored)."""
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "output" in row:
            entries[row["output"]] = row
    return entries


def _stat(path: Path | None) -> tuple[int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if st is not None else None


def _is_done(item: Item, entry: dict | None, out: Path, model_id: str) -> bool:
    """True when the output is there, written by this model from these very input bytes."""
    if entry is None or entry.get("model") != model_id or not (out / item.out_rel).is_file():
        return False
    st = _stat(item.path)
    if item.record is not None:  # the record's bytes, unchanged since (they were checked against it then)
        return entry.get("sha256") == item.record.sha256 and st is not None and list(st) == entry.get("stat")
    if st is not None and list(st) == entry.get("stat"):
        return True
    try:  # size or mtime changed (a copy, a touch): the content decides
        return sha256_bytes(read_bytes(item.path, item.rel)) == entry.get("sha256")
    except BadImageError:
        return False


# ---------------------------------------------------------------------------------------
# running the model


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def _png(y: torch.Tensor) -> bytes:
    return png_bytes((y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())  # (H, W, 3)


def run_model(runner: Runner, x: torch.Tensor, p: Plan, overlap: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) float32 in [0, 1]; tiles per plan; CUDA out-of-memory -> smaller tiles."""
    tile = p.tile
    if runner.kind == "torch":
        x = x.to(runner.device)  # tiles are blended on the model's device
    while True:
        try:
            with torch.no_grad():
                y = tiled_forward(runner, x, tile=tile, overlap=min(overlap, tile // 2)) if tile else runner(x)
            return y.float().clamp_(0.0, 1.0)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            side = max(x.shape[-2:]) if not tile else tile
            if side <= 64:
                raise
            tile = max(64, side // 2)
            logger.warning("CUDA out of memory: retrying with %d px tiles", tile)


class _Run:
    """State of one restore run (what was written, skipped, timed)."""

    def __init__(self, cfg: RestoreConfig, runner: Runner, out: Path, log: dict[str, dict]):
        self.cfg, self.runner, self.out, self.log = cfg, runner, out, log
        self.skipped: dict[str, dict] = {}
        self.written = 0
        self.model_s = 0.0
        self.budget = cfg.memory_mb * 2**20
        self.log_f = open(out / LOG_NAME, "a", encoding="utf-8")  # noqa: SIM115  closed by close()

    def close(self) -> None:
        self.log_f.close()

    def plan(self, h: int, w: int) -> Plan:
        r = self.runner
        return plan(h, w, bytes_per_pixel=r.bytes_per_pixel, budget_bytes=self.budget,
                    max_batch=self.cfg.batch_size, tile=self.cfg.tile, multiple=r.multiple)  # fmt: skip

    def skip(self, item: Item, reason: str, message: str) -> None:
        self.skipped[item.rel] = {"input": item.rel, "reason": reason, "message": message}

    def decode(self, item: Item) -> tuple[Image.Image, str | None, str, tuple[int, int] | None] | None:
        """(RGB image, converted_from, sha256, (size, mtime) before reading) or None after recording why not."""
        st = _stat(item.path)  # before reading: a file changed meanwhile is then redone by the next run
        try:
            if item.record is not None:
                if item.record.path is None:
                    raise BadImageError("no_path", f"record {item.record.id!r} has only a url; nothing local to open")
                img, conv = load_rgb_checked(self.cfg.root, item.record, check_hash=True)
                return img, conv, item.record.sha256, st
            data = read_bytes(item.path, item.rel)
            img, conv = decode_rgb(data, name=item.rel)
            return img, conv, sha256_bytes(data), st
        except BadImageError as e:
            self.skip(item, e.reason, str(e))
            return None

    def run_batch(self, batch: list[tuple], bar: Any) -> None:
        """One forward over same-size images (or one tiled image); write PNGs and log lines."""
        x = torch.stack([_to_tensor(img) for _, img, *_ in batch])  # (B, 3, H, W)
        p = self.plan(x.shape[2], x.shape[3])
        t0 = time.perf_counter()
        try:
            y = run_model(self.runner, x, p, self.cfg.tile_overlap)
        except Exception as e:  # noqa: BLE001  a model failure on some inputs is reported, never a crash
            for item, *_ in batch:
                self.skip(item, "model_error", f"{item.rel}: the model failed ({type(e).__name__}: {str(e)[:300]})")
            bar.update(len(batch))
            return
        self.model_s += time.perf_counter() - t0
        if tuple(y.shape) != tuple(x.shape):
            raise D4IRError(
                f"the model returned {tuple(y.shape)} for an input of {tuple(x.shape)}: `d4ir restore` needs an "
                "image-to-image model whose output has the input's size (check the model name / kwargs)"
            )
        for (item, img, conv, sha, st), yi in zip(batch, y, strict=True):
            atomic_write_bytes(self.out / item.out_rel, _png(yi))
            entry = {
                "input": item.rel,
                "output": item.out_rel,
                "sha256": sha,
                "stat": list(st) if st else None,
                "model": self.runner.identity["id"],
                "size": [img.width, img.height],
                "converted_from": conv,
                "tiled": p.tile or None,
            }
            self.log_f.write(json.dumps(entry, sort_keys=True) + "\n")
            self.log_f.flush()
            os.fsync(self.log_f.fileno())
            self.log[item.out_rel] = entry
            self.written += 1
        bar.update(len(batch))


def _process(run: _Run, todo: list[Item]) -> None:
    """Group by header size, decode a chunk at a time, batch same-size images, tile large ones."""
    from tqdm import tqdm

    groups: dict[tuple[int, int] | None, list[Item]] = defaultdict(list)
    for item in todo:
        groups[_header_size(item)].append(item)
    bar = tqdm(total=len(todo), unit="img", desc="restore", disable=not run.cfg.progress, dynamic_ncols=True)
    try:
        for size in sorted(groups, key=lambda s: (s is None, s or (0, 0))):
            members = groups[size]
            n = run.plan(*size).batch if size is not None else 1
            for start in range(0, len(members), n):
                _run_chunk(run, members[start : start + n], bar)
    finally:
        bar.close()


def _run_chunk(run: _Run, chunk: list[Item], bar: Any) -> None:
    """Decode ``chunk`` (one header size), then run its images in batches of one decoded size."""
    by_size: dict[tuple[int, int], list] = defaultdict(list)
    for item in chunk:
        got = run.decode(item)
        if got is None:
            bar.update(1)
            continue
        by_size[(got[0].height, got[0].width)].append((item, *got))
    for (h, w), batch in by_size.items():
        per = run.plan(h, w).batch
        for b0 in range(0, len(batch), per):
            run.run_batch(batch[b0 : b0 + per], bar)


# ---------------------------------------------------------------------------------------
# summary and sheet


def _sheet(cfg: RestoreConfig, items: list[Item], log: dict[str, dict], out: Path) -> bytes | None:
    """input | output rows for the first ``sheet_images`` restored inputs, each row SHEET_HEIGHT tall."""
    rows = []
    for item in items:
        if len(rows) >= cfg.sheet_images or item.out_rel not in log:
            continue
        try:
            if item.record is not None:
                src = load_rgb_checked(cfg.root, item.record)[0]
            else:
                src = decode_rgb(read_bytes(item.path, item.rel), name=item.rel)[0]
            dst = Image.open(out / item.out_rel).convert("RGB")
        except (BadImageError, OSError) as e:
            logger.info("sheet: leaving out %s (%s)", item.rel, e)
            continue
        w = max(1, round(src.width * SHEET_HEIGHT / src.height))
        rows.append((src.resize((w, SHEET_HEIGHT), Image.BICUBIC), dst.resize((w, SHEET_HEIGHT), Image.BICUBIC)))
    if not rows:
        return None
    gap = 8
    width = max(2 * a.width + gap for a, _ in rows)
    sheet = Image.new("RGB", (width, len(rows) * (SHEET_HEIGHT + gap) - gap), (255, 255, 255))
    for i, (a, b) in enumerate(rows):
        y = i * (SHEET_HEIGHT + gap)
        sheet.paste(a, (0, y))
        sheet.paste(b, (a.width + gap, y))
    return png_bytes(np.asarray(sheet))


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write unless the file already holds exactly ``data`` (a rerun with nothing to do writes nothing)."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    return True


def restore(cfg: RestoreConfig) -> RestoreResult:
    """Restore every input of ``cfg`` into ``cfg.out``; rerunning skips outputs already written for this model."""
    t_start = time.perf_counter()
    # 1. inputs and the output folder
    items, ignored, guard = list_inputs(cfg)
    if not cfg.out:
        raise D4IRError("`out` is empty: give the output folder")
    out = Path(cfg.out)
    check_out_dir(out, guard, Path(cfg.input))
    if out.exists() and not out.is_dir():
        raise D4IRError(f"`out` = {str(out)!r} exists and is not a folder")
    with torch_threads(cfg.threads):
        # 2. the model
        runner = load_runner(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)
        for note in runner.notes:
            logger.info("model: %s", note)
        # 3. what an earlier run finished
        run = _open_run(cfg, runner, out)
        try:
            todo = _todo(run, items)
            # 4. run
            _process(run, todo)
        finally:
            run.close()
    # 5. summary (+ sheet), rewritten only when it changes
    log = _read_log(out / LOG_NAME)
    model_id = runner.identity["id"]
    restored = [
        {"input": i.rel, "output": i.out_rel, "converted_from": log[i.out_rel].get("converted_from"),
         "tiled": log[i.out_rel].get("tiled")}
        for i in items
        if i.rel not in run.skipped and log.get(i.out_rel, {}).get("model") == model_id
    ]  # fmt: skip
    skipped = [run.skipped[k] for k in sorted(run.skipped)]
    summary = _summary(cfg, runner, len(items), restored, skipped, ignored)
    summary_path = out / SUMMARY_NAME
    _write_if_changed(summary_path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    sheet_path = None
    if cfg.sheet and (data := _sheet(cfg, items, log, out)) is not None:
        sheet_path = out / SHEET_NAME
        _write_if_changed(sheet_path, data)
    return RestoreResult(
        out_dir=out,
        summary_path=summary_path,
        sheet_path=sheet_path,
        inputs=len(items),
        restored=len(restored),
        written=run.written,
        skipped=skipped,
        not_images=ignored,
        exit_code=summary["exit_code"],
        seconds=time.perf_counter() - t_start,
        model_seconds=run.model_s,
        notes=list(runner.notes),
    )


def _open_run(cfg: RestoreConfig, runner: Runner, out: Path) -> _Run:
    """The run's state over the earlier runs' log; outputs of another model are refused unless ``overwrite``."""
    model_id = runner.identity["id"]
    log = _read_log(out / LOG_NAME)
    others = sorted({e.get("model") for e in log.values()} - {model_id})
    if others and not cfg.overwrite:
        n = sum(e.get("model") != model_id for e in log.values())
        raise D4IRError(
            f"`out` = {str(out)!r} holds {n} output(s) restored by another model ({others}); choose another "
            "folder, or pass --overwrite to redo them with this model"
        )
    out.mkdir(parents=True, exist_ok=True)
    return _Run(cfg, runner, out, log)


def _todo(run: _Run, items: list[Item]) -> list[Item]:
    """The items still to restore: not written completely by an earlier run of this model."""
    model_id = run.runner.identity["id"]
    todo: list[Item] = []
    for item in items:
        if item.out_rel == SHEET_NAME:
            run.skip(item, "reserved_name", f"{item.rel}: its output name {SHEET_NAME} is the sheet's")
        elif not _is_done(item, run.log.get(item.out_rel), run.out, model_id):
            todo.append(item)
    logger.info(
        "restore: %d input(s), %d already done, %d to run (%s, %s)",
        len(items), len(items) - len(todo) - len(run.skipped), len(todo), run.runner.kind, run.runner.dtype,
    )  # fmt: skip
    return todo


def _summary(cfg: RestoreConfig, runner: Runner, inputs: int, restored: list[dict], skipped: list[dict],
             ignored: list[str]) -> dict:  # fmt: skip
    """The ``restore-summary.json`` document."""
    exit_code = 1 if skipped else 0
    return {
        "kind": "d4ir-restore",
        "version": 1,
        "input": cfg.input,
        "root": cfg.root or None,
        "model": {"kind": runner.kind, **{k: runner.identity.get(k) for k in ("id", "path", "spec")}},
        "settings": {
            "device": str(runner.device),
            "dtype": str(runner.dtype).replace("torch.", ""),
            "memory_mb": cfg.memory_mb,
            "tile": cfg.tile,
            "tile_overlap": cfg.tile_overlap,
            "activation_bytes_per_pixel": round(runner.bytes_per_pixel, 1),
        },
        "counts": {
            "inputs": inputs,
            "restored": len(restored),
            "skipped": len(skipped),
            "converted": sum(1 for r in restored if r["converted_from"]),
            "tiled": sum(1 for r in restored if r["tiled"]),
            "not_images": len(ignored),
        },
        "restored": restored,
        "skipped": skipped,
        "not_images": ignored,
        "exit_code": exit_code,
        "exit_codes": {str(k): v for k, v in EXIT_CODES.items()},
    }


# ---------------------------------------------------------------------------------------
# command


@click.command("restore", epilog="Exit codes: " + "; ".join(f"{k}: {v}" for k, v in EXIT_CODES.items()))
@click.argument("input_path", metavar="INPUT", required=False)
@click.option("--model", "checkpoint", default=None,
              help="Model folder (model.json), 'reference', a weights file (with --arch) or an exported .onnx.")  # fmt: skip
@click.option("--out", default=None, help="Output folder (not inside INPUT).")
@click.option("--root", default=None, help="Image root, when INPUT is a manifest (.jsonl).")
@click.option("--arch", default=None, help="Architecture of a bare weights file (registry name or pkg.module:Class).")
@click.option("--kwargs", "kwargs_", default=None, metavar="TOML", help="Constructor arguments, e.g. '{width = 32}'.")
@click.option("--key", default=None, help="Container key inside a .pth (e.g. params_ema).")
@click.option("--weather", default=None, help="Non-blind teachers (WGWS-Net): the weather to restore.")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
@click.option("--memory-mb", type=int, default=None, help="Activation memory budget per forward (default 2048).")
@click.option("--tile", type=int, default=None, help="Fixed tile side in px (default: from the memory budget).")
@click.option("--batch-size", type=int, default=None, help="Most images of one size per forward (default 8).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: library default).")
@click.option("--sheet", is_flag=True, help="Also write restore-sheet.png (input | output).")
@click.option("--overwrite", is_flag=True, help="Redo outputs an earlier run wrote with another model.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
def restore_command(input_path, checkpoint, out, root, arch, kwargs_, key, weather, device, memory_mb, tile, batch_size,
                    threads, sheet, overwrite, config_path, sets) -> None:  # fmt: skip
    """Restore INPUT (an image, a folder tree or a manifest) with a model; PNGs mirror INPUT under --out."""
    options = {
        "input": input_path,
        "out": out,
        "root": root,
        "model.checkpoint": checkpoint,
        "model.arch": arch,
        "model.kwargs": RawToml(kwargs_) if kwargs_ else None,
        "model.key": key,
        "model.weather": weather,
        "device": device,
        "memory_mb": memory_mb,
        "tile": tile,
        "batch_size": batch_size,
        "threads": threads,
        "sheet": True if sheet else None,
        "overwrite": True if overwrite else None,
    }
    r = restore(config_from_cli(RestoreConfig, config_path, sets, options))
    click.echo(
        f"restored {r.restored} of {r.inputs} input(s) into {r.out_dir} ({r.written} written now, "
        f"{len(r.skipped)} skipped, {len(r.not_images)} non-image file(s) ignored) in {r.seconds:.1f} s"
    )
    for s in r.skipped[:20]:
        click.echo(f"  skipped {s['input']}: {s['reason']} ({s['message']})")
    if len(r.skipped) > 20:
        click.echo(f"  ... and {len(r.skipped) - 20} more")
    click.echo(f"summary: {r.summary_path}" + (f"  sheet: {r.sheet_path}" if r.sheet_path else ""))
    click.echo(f"exit code {r.exit_code}: {EXIT_CODES[r.exit_code]}")
    if r.exit_code:
        raise SystemExit(r.exit_code)
