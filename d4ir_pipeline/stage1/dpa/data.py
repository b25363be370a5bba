"""d4ir_pipeline.stage1.dpa.data."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from d4ir_pipeline.data.manifests import load_manifest, open_rgb
from d4ir_pipeline.errors import BadImageError
from d4ir_pipeline.stage1.dpa.config import DPAConfig, DPADataError
from d4ir_pipeline.stage1.dpa.model import (
    prepare_image,
    resize,
)

logger = logging.getLogger(__name__)


def _random_crop_box(h: int, w: int, side: tuple[float, float], gen: torch.Generator) -> tuple[int, int, int]:
    """A random square (top, left, side) whose side is drawn in ``side`` px (clamped to the image)."""
    u = torch.rand(3, generator=gen).tolist()
    s = max(1, min(h, w, round(side[0] + (side[1] - side[0]) * u[0])))
    return int(u[1] * (h - s + 1)), int(u[2] * (w - s + 1)), s


class ImageStore:
    """The usable training images: decoded once to check them, kept in memory when asked."""

    def __init__(self, records: list, root: str, load_size: int, cache: bool):

        self.root, self.load_size, self.cache = root, load_size, cache
        self.records, self.images, self.skipped = [], [], Counter()
        for rec in progress_bar(records, desc="check images"):
            try:
                img = prepare_image(open_rgb(root, rec), load_size)
            except BadImageError as e:
                self.skipped[e.reason] += 1
                logger.warning("skipping %s: %s", rec.id, e)
                continue
            self.records.append(rec)
            if cache:
                self.images.append(img)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> torch.Tensor:
        """uint8 (3, H, W)."""
        if self.cache:
            return self.images[i]

        return prepare_image(open_rgb(self.root, self.records[i]), self.load_size)


def usable_records(manifest: str, root: str, *, what: str = "data.manifest") -> list:
    """Load a degraded-image manifest and refuse, before any work, what cannot be trained on."""

    records = load_manifest(manifest)
    clean = [r for r in records if r.weather == "clean"]
    if clean:
        logger.warning("%s: ignoring %d record(s) labelled 'clean' (not degraded)", manifest, len(clean))
    records = [r for r in records if r.weather != "clean"]
    if not records:
        raise DPADataError(
            f"`{what}` = {manifest!r}: no degraded images ({len(clean)} clean record(s), 0 rain/haze/snow/unlabelled); "
            "the DPA learns from web-degraded photos: build the manifest from a folder of degraded images"
        )
    rootp = Path(root)
    if not rootp.is_dir():
        raise DPADataError(f"image root {root!r} (for `{what}` = {manifest!r}) is not a folder")
    missing = [r for r in records if r.path is None or not (rootp / r.path).is_file()]
    if missing:
        shown = ", ".join(f"{r.id!r} ({r.path or 'url only'})" for r in missing[:5])
        raise DPADataError(
            f"`{what}` = {manifest!r}: {len(missing)} of {len(records)} image file(s) missing under root {root!r}, "
            f"e.g. {shown}; fix the root (data.root / --set) or rebuild the manifest"
        )
    return records


def check_labels(records: list, *, require: bool, where: str) -> None:
    """With labels required: every record labelled and at least two weathers."""
    if not require:
        return
    unlabelled = [r for r in records if r.weather is None]
    if unlabelled:
        raise DPADataError(
            f"{where}: {len(unlabelled)} image(s) without a weather label (e.g. {unlabelled[0].id!r}) while "
            "`data.require_labels` = true; label them (folder names rain/ haze/ snow/) or set require_labels = false"
        )
    weathers = sorted({r.weather for r in records})
    if len(weathers) < 2:
        raise DPADataError(
            f"{where}: only one weather ({weathers}) while `data.require_labels` = true; supervised contrast needs "
            "at least two weathers (the others are its negatives): add images of another weather, or set "
            "data.require_labels = false and loss.supervised = false"
        )


def make_views(store: ImageStore, idx: list[int], cfg: DPAConfig, enc_size: int, sd_size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Two random crops per image at the encoder size, and view one at the SD resolution.

    Returns (v1 (B,3,S,S), v2 (B,3,S,S), sd_view (B,3,R,R)), floats in [0, 1].
    """
    v1, v2, vsd = [], [], []
    side = (cfg.data.crop_zoom[0] * enc_size, cfg.data.crop_zoom[1] * enc_size)  # crop side range in px
    for i in idx:
        img = store.get(i)
        _, h, w = img.shape
        for which in (1, 2):
            top, left, cs = _random_crop_box(h, w, side, gen)
            crop = img[:, top : top + cs, left : left + cs].float().div(255.0)[None]  # (1, 3, cs, cs)
            flip = cfg.data.hflip and bool(torch.rand(1, generator=gen) < 0.5)
            if flip:
                crop = crop.flip(-1)
            if cfg.data.color_aug:
                crop = _color_jitter(crop, gen)
            if cfg.data.veil_aug > 0:
                crop = _veil_jitter(crop, cfg.data.veil_aug, gen)
            if which == 1:
                v1.append(resize(crop, enc_size))
                vsd.append(resize(crop, sd_size) if sd_size else crop.new_zeros(1, 3, 1, 1))
            else:
                v2.append(resize(crop, enc_size))
    return torch.cat(v1), torch.cat(v2), torch.cat(vsd)


def _color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Permute RGB channels and scale saturation: (1, 3, h, w) in [0, 1].

    [design] Rain, snow and haze are grey-white (airlight, scattered light), so a
    channel permutation keeps the weather and changes the content's colours: with few
    source photos, this stops the encoder from tying a weather to a photo's palette.
    """
    perm = torch.randperm(3, generator=gen)
    sat = 0.6 + 0.8 * float(torch.rand(1, generator=gen))
    x = x[:, perm]
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (1, 1, h, w)
    return (grey + sat * (x - grey)).clamp(0.0, 1.0)


def _veil_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random exposure (0.8-1.2x) and a grey veil of up to ``strength``: (1, 3, h, w) in [0, 1].

    [design] Exposure and black level vary between photos whatever the weather; a light
    veil on every weather stops the encoder from reading snow's faint veil (or a dark
    sky) as the weather, and leaves haze, a strong depth-dependent veil, distinct.
    """
    u = torch.rand(3, generator=gen).tolist()
    gain = 0.8 + 0.4 * u[0]
    v = strength * u[1]
    level = 0.6 + 0.4 * u[2]
    return ((x * gain).clamp(0.0, 1.0) * (1.0 - v) + v * level).clamp(0.0, 1.0)


def progress_bar(it, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, disable=None, leave=False, **kw)
