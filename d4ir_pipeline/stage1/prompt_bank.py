"""Stage one, part 2: the prompt bank, the DPA tokens of every web-degraded image.

``d4ir prompt-bank`` encodes each image of the web-degraded manifest with the trained
DPA (``{dpa}``) into K x D prompt tokens and writes, atomically, the folder
described in docs/ARCHITECTURE.md ("Prompt bank"):

- ``tokens.safetensors``: ``tokens`` float32 (N, K, D) and ``centroids`` float32 (W, K, D)
  (per-weather mean of the tokens, in the order of ``bank.json["weathers"]``);
- ``index.jsonl``: row i is ``{"row": i, "id", "sha256", "weather"}``;
- ``bank.json``: ``weathers``, ``K``, ``D``, ``adapter_sha256`` (sha256 of
  ``dpa.safetensors``), ``sd_model``, ``created``, plus ``kind``, ``version``,
  ``num_rows``, ``counts``, ``manifest_sha256``, ``skipped``.

The tokens go straight into diffusers as ``prompt_embeds`` (B, K, D). Rerunning is a
no-op while the adapter and the manifest are unchanged.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
    sha256_file,
)
from d4ir_pipeline.common.runtime import pick_device
from d4ir_pipeline.config import opt
from d4ir_pipeline.data.manifests import open_rgb
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.stage1.dpa.data import usable_records
from d4ir_pipeline.stage1.dpa.model import encode_images, load_dpa, prepare_image

logger = logging.getLogger(__name__)

BANK_KIND = "d4ir-prompt-bank"
BANK_VERSION = 1


@dataclass(frozen=True)
class BankSection:
    """Inputs and output of the prompt bank."""

    dpa_dir: str = opt("{dpa}", help="Output folder of `d4ir train-dpa` (dpa.json + dpa.safetensors).")
    manifest: str = opt("{data}/manifests/web-degraded.jsonl", help="The web-degraded images to encode.")
    root: str = opt("{data}", help="Image root of the manifest.")
    batch_size: int = opt(64, min=1, help="Images encoded per forward pass.")
    overwrite: bool = opt(False, help="Rebuild even when the bank matches the adapter and the manifest.")


@dataclass(frozen=True)
class OutputSection:
    """Where the bank goes."""

    dir: str = opt("{bank}", help="Bank folder (replaced atomically).")


@dataclass(frozen=True)
class RuntimeSection:
    """Where the encoder runs."""

    device: str = opt("auto", help="auto | cpu | cuda[:N].")


@dataclass(frozen=True)
class BankConfig:
    """Config of `d4ir prompt-bank` (stages/<profile>/prompt-bank.toml)."""

    bank: BankSection = field(default_factory=BankSection)
    output: OutputSection = field(default_factory=OutputSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


@dataclass
class BankResult:
    """What `build_prompt_bank` did."""

    out_dir: Path
    num_rows: int
    weathers: list[str]
    counts: dict[str, int]
    K: int  # noqa: N815 - the paper's symbols
    D: int  # noqa: N815
    adapter_sha256: str
    skipped: dict[str, int] = field(default_factory=dict)
    up_to_date: bool = False


class PromptBank:
    """A prompt bank folder in memory: ``tokens`` (N, K, D), ``centroids`` (W, K, D), index rows."""

    def __init__(self, tokens: torch.Tensor, centroids: torch.Tensor, records: list[dict], meta: dict, path: Path):
        self.tokens = tokens
        self.centroids = centroids
        self.records = records
        self.meta = meta
        self.weathers: list[str] = list(meta["weathers"])
        self.path = path
        self._rows: dict[str | None, list[int]] = {}
        for r in records:
            self._rows.setdefault(r["weather"], []).append(r["row"])

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.tokens.shape[1])

    @property
    def D(self) -> int:  # noqa: N802
        return int(self.tokens.shape[2])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptBank:
        """Read and check a bank folder; any inconsistency is an error naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_p, tok_p, idx_p = path / "bank.json", path / "tokens.safetensors", path / "index.jsonl"
        for p in (meta_p, tok_p, idx_p):
            if not p.is_file():
                raise D4IRError(f"prompt bank {str(path)!r}: {p.name} is missing (run `d4ir prompt-bank`)")
        meta = read_json(meta_p)
        if meta.get("kind") != BANK_KIND:
            raise D4IRError(f"{meta_p}: `kind` = {meta.get('kind')!r}, expected {BANK_KIND!r}")
        try:
            tensors = load_file(str(tok_p))
        except (SafetensorError, OSError) as e:
            raise D4IRError(f"{tok_p}: cannot be read ({e})") from e
        if set(tensors) != {"tokens", "centroids"}:
            raise D4IRError(f"{tok_p}: expected tensors ['centroids', 'tokens'], found {sorted(tensors)}")
        tokens, centroids = tensors["tokens"], tensors["centroids"]
        k, d, weathers = meta["K"], meta["D"], meta["weathers"]
        if tokens.dtype != torch.float32 or tokens.ndim != 3 or tuple(tokens.shape[1:]) != (k, d):
            raise D4IRError(f"{tok_p}: `tokens` {tuple(tokens.shape)} {tokens.dtype}, expected float32 (N, {k}, {d})")
        if tuple(centroids.shape) != (len(weathers), k, d):
            raise D4IRError(f"{tok_p}: `centroids` {tuple(centroids.shape)}, expected ({len(weathers)}, {k}, {d})")
        records = list(read_jsonl(idx_p))
        if len(records) != tokens.shape[0] or any(r.get("row") != i for i, r in enumerate(records)):
            raise D4IRError(f"{idx_p}: {len(records)} rows numbered 0..N-1 expected to match {tokens.shape[0]} tokens")
        return cls(tokens, centroids, records, meta, path)

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        tokens: torch.Tensor,
        rows: list[dict],
        *,
        meta: dict,
        weathers: list[str] | None = None,
        centroids: torch.Tensor | None = None,
    ) -> PromptBank:
        """Write a bank folder atomically: ``tokens`` (N, K, D) float32, one index row per token
        (``id``, ``sha256``, ``weather`` and any extra keys), ``meta`` merged into bank.json.

        ``weathers`` (centroid order) defaults to the sorted labelled weathers of ``rows`` and
        ``centroids`` (W, K, D) to each weather's mean tokens. The one writer of the format:
        the DPA bank, compare's text-prompt bank and the test builders all come through here.
        """
        from safetensors.torch import save

        tokens = tokens.float().contiguous()
        if tokens.ndim != 3 or len(rows) != tokens.shape[0]:
            raise D4IRError(f"prompt bank {str(path)!r}: {len(rows)} rows for tokens {tuple(tokens.shape)}")
        if weathers is None:
            weathers = sorted({r["weather"] for r in rows if r.get("weather") is not None})
        if centroids is None:
            centroids = torch.zeros(len(weathers), *tokens.shape[1:])
            for j, w in enumerate(weathers):
                centroids[j] = tokens[[i for i, r in enumerate(rows) if r.get("weather") == w]].mean(0)
        doc = {
            **meta,
            "kind": BANK_KIND,
            "version": BANK_VERSION,
            "weathers": list(weathers),
            "K": int(tokens.shape[1]),
            "D": int(tokens.shape[2]),
            "num_rows": len(rows),
        }
        with atomic_dir(path) as stage:
            atomic_write_bytes(
                stage / "tokens.safetensors", save({"tokens": tokens, "centroids": centroids.contiguous()})
            )
            atomic_write_jsonl(stage / "index.jsonl", ({"row": i, **r} for i, r in enumerate(rows)))
            atomic_write_json(stage / "bank.json", doc)
        return cls.load(path)

    def rows_for(self, weather: str | None) -> list[int]:
        """Row numbers of the images of ``weather`` (None: the unlabelled ones)."""
        if weather is not None and weather not in self._rows:
            have = sorted(w for w in self._rows if w is not None)
            raise KeyError(f"weather {weather!r} is not in the prompt bank {str(self.path)!r}; it has {have}")
        return list(self._rows.get(weather, []))

    def centroid(self, weather: str) -> torch.Tensor:
        """The (K, D) mean tokens of ``weather``."""
        if weather not in self.weathers:
            raise KeyError(f"weather {weather!r} has no centroid in {str(self.path)!r}; it has {self.weathers}")
        return self.centroids[self.weathers.index(weather)]


def _bank_is_current(out: Path, adapter_sha: str, manifest_sha: str) -> bool:
    meta_p = out / "bank.json"
    if not meta_p.is_file() or not (out / "tokens.safetensors").is_file() or not (out / "index.jsonl").is_file():
        return False
    meta = read_json(meta_p)
    return meta.get("adapter_sha256") == adapter_sha and meta.get("manifest_sha256") == manifest_sha


def build_prompt_bank(cfg: BankConfig) -> BankResult:
    """Encode every web-degraded image with the trained DPA into the prompt bank folder."""
    b = cfg.bank
    out = Path(cfg.output.dir)
    # 1. check inputs (before loading anything heavy)
    weights = Path(b.dpa_dir) / "dpa.safetensors"
    dpa_meta_p = Path(b.dpa_dir) / "dpa.json"
    if not weights.is_file() or not dpa_meta_p.is_file():
        raise D4IRError(f"`bank.dpa_dir` = {b.dpa_dir!r}: no trained DPA there (dpa.json / dpa.safetensors); "
                        "run `d4ir train-dpa` first")  # fmt: skip
    records = usable_records(b.manifest, b.root, what="bank.manifest")
    adapter_sha, manifest_sha = sha256_file(weights), sha256_file(b.manifest)

    # 2. up to date?
    if not b.overwrite and _bank_is_current(out, adapter_sha, manifest_sha):
        bank = PromptBank.load(out)
        logger.info("prompt bank %s is up to date (same adapter and manifest)", out)
        return BankResult(out, len(bank), bank.weathers, dict(bank.meta.get("counts", {})), bank.K, bank.D,
                          adapter_sha, dict(bank.meta.get("skipped", {})), up_to_date=True)  # fmt: skip

    # 3. encode
    device = pick_device(cfg.runtime.device)
    model, dpa_meta = load_dpa(b.dpa_dir, device=device)
    load_size = int(dpa_meta["spec"]["load_size"])
    kept, chunks, skipped = [], [], Counter()
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(records), b.batch_size), desc="prompt bank", disable=None, leave=False):
        imgs = []
        for rec in records[i : i + b.batch_size]:
            try:
                imgs.append(prepare_image(open_rgb(b.root, rec), load_size))
            except BadImageError as e:
                skipped[e.reason] += 1
                logger.warning("skipping %s: %s", rec.id, e)
                continue
            kept.append(rec)
        if imgs:
            chunks.append(encode_images(model, imgs, device, batch=b.batch_size))
    if not kept:
        raise D4IRError(f"`bank.manifest` = {b.manifest!r}: every image was unreadable {dict(skipped)}")
    tokens = torch.cat(chunks).float().contiguous()  # (N, K, D)
    if not any(r.weather for r in kept):
        logger.warning("no weather labels in %s: the bank has no centroids", b.manifest)
    counts = dict(Counter(r.weather or "unlabelled" for r in kept))

    # 4. write (a staging folder swapped into place)
    meta = {
        "adapter_sha256": adapter_sha,
        "sd_model": dpa_meta["spec"].get("sd_model"),
        "sd_model_id": dpa_meta["spec"].get("sd_model_id"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "counts": counts,
        "manifest": str(b.manifest),
        "manifest_sha256": manifest_sha,
        "skipped": dict(skipped),
    }
    rows = [{"id": r.id, "sha256": r.sha256, "weather": r.weather} for r in kept]
    bank = PromptBank.write(out, tokens, rows, meta=meta)
    more = f"; skipped {dict(skipped)}" if skipped else ""
    logger.info("prompt bank: %d rows (%s), K=%d, D=%d -> %s%s", len(kept), counts, bank.K, bank.D, out, more)
    return BankResult(out, len(kept), bank.weathers, counts, bank.K, bank.D, adapter_sha, dict(skipped))


@stage_command("prompt-bank", BankConfig)
def prompt_bank_command(cfg: BankConfig) -> None:
    """Stage one: encode every web-degraded image into the prompt bank (stages/<profile>/prompt-bank.toml)."""
    res = build_prompt_bank(cfg)
    state = "up to date" if res.up_to_date else "written"
    line = f"prompt bank {state}: {res.num_rows} rows {res.counts}, K={res.K}, D={res.D} -> {res.out_dir}"
    if res.skipped:
        line += f"; skipped {res.skipped}"
    click.echo(line)
