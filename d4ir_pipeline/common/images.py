"""Images: hardened decoding of any file to 8-bit RGB, encoding, grids, and the one PSNR."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from d4ir_pipeline.common.io import atomic_write_bytes, sha256_bytes
from d4ir_pipeline.errors import BadImageError

if TYPE_CHECKING:  # torch stays unimported for the light commands (manifest, data)
    from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".pbm"}
)

# Reasons :func:`load_rgb_file` gives in ``BadImageError.reason``.
BAD_IMAGE_REASONS: tuple[str, ...] = (
    "missing",  # no such file (or a dangling symlink)
    "unreadable",  # exists but cannot be read (permissions, a directory, I/O error)
    "escapes_root",  # its path (or a symlink) leads outside the image root
    "no_path",  # a url-only record: nothing local to open
    "empty",  # zero bytes
    "not_image",  # Pillow cannot identify it (text file named .png, ...)
    "truncated",  # the header is fine but the pixel data ends early
    "corrupt",  # the pixel data does not decode for another reason
    "decompression_bomb",  # more pixels than PIL.Image.MAX_IMAGE_PIXELS
    "too_small",  # shorter side below the requested minimum
    "unsupported_mode",  # a pixel mode that cannot be turned into RGB
    "changed",  # bytes no longer match the record's sha256 (only when asked to check)
)


# --------------------------------------------------------------------------- loading

_TRUNCATION_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Force Pillow to report truncated data even if a library set LOAD_TRUNCATED_IMAGES."""
    with _TRUNCATION_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _white_composite(img: Image.Image) -> Image.Image:
    """Alpha-composite on white (see :func:`decode_rgb` for why white)."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _gray_to_rgb(arr8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(arr8[:, :, None], 3, axis=2)), mode="RGB")


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with exact rounding (v / 257)."""
    v = arr.astype(np.int64)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255 (NaN -> 0); a constant image becomes 0."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.round((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, raw: str | None = None) -> tuple[Image.Image, str | None]:
    """Convert a loaded image to 8-bit RGB; returns (image, original mode or None if RGB)."""
    mode = img.mode
    if mode == "RGB":
        # Pillow reads 48-bit RGB PNG/TIFF as RGB keeping the high byte of each sample
        return img, ("RGB;16" if raw and ";16" in raw else None)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _white_composite(img), mode
    if mode == "P":
        if "transparency" in img.info:
            return _white_composite(img), mode
        return img.convert("RGB"), mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(img))), mode
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(arr)), mode
        return _gray_to_rgb(_stretch(arr)), mode
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr).all()
        if finite and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return _gray_to_rgb(np.round(arr * 255.0).astype(np.uint8)), mode
        return _gray_to_rgb(_stretch(arr)), mode
    try:  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
        return img.convert("RGB"), mode
    except (ValueError, OSError) as e:
        raise BadImageError("unsupported_mode", f"pixel mode {mode!r} cannot be converted to RGB ({e})") from e


def _raw_mode(img: Image.Image) -> str | None:
    tile = getattr(img, "tile", None) or []
    for t in tile:
        args = t[3] if len(t) > 3 else None
        if isinstance(args, str):
            return args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            return args[0]
    return None


def decode_rgb(data: bytes, *, name: str = "<bytes>", min_side: int = 1) -> tuple[Image.Image, str | None]:
    """Decode image bytes to a fully loaded 8-bit RGB image; bad data -> ``BadImageError``.

    Returns ``(image, converted_from)`` where ``converted_from`` is the original pixel
    mode when a conversion happened (``"CMYK"``, ``"L"``, ``"P"``, ``"RGBA"``, ``"I;16"``,
    ``"RGB;16"``, ...) and ``None`` for plain 8-bit RGB. Alpha is composited on WHITE:
    dropping it would expose whatever colour sits under transparent pixels (often black
    or junk), and white is how viewers and web pages show such images. 16-bit data is
    scaled v/257 (exact rounding), not clipped; ``I`` images are read as 16-bit when
    they fit 0..65535 and min-max stretched otherwise; ``F`` images as 0..1 when they fit,
    stretched otherwise. EXIF orientation is applied (sizes are those after rotation).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's warning level is a bomb too
        try:
            return _decode(data, name, min_side)
        finally:
            for w in caught:  # damaged files make Pillow warn (bad TIFF tags, ...): keep the build output clean
                logger.debug("%s: %s", name, w.message)


def _decode(data: bytes, name: str, min_side: int) -> tuple[Image.Image, str | None]:
    if not data:
        raise BadImageError("empty", f"{name}: file is empty (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError("decompression_bomb", f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImageError("not_image", f"{name}: not an image Pillow can identify") from e
    except Exception as e:  # noqa: BLE001  malformed files raise anything (struct.error, TypeError, ...)
        raise BadImageError("corrupt", f"{name}: header does not decode ({type(e).__name__}: {e})") from e
    w, h = img.size
    if limit is not None and w * h > limit:  # also catches a limit lowered after open
        raise BadImageError(
            "decompression_bomb",
            f"{name}: {w}x{h} = {w * h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit}",
        )
    if min(w, h) < min_side:
        raise BadImageError("too_small", f"{name}: {w}x{h} has a side below the minimum {min_side}")
    raw = _raw_mode(img)  # Pillow clears `tile` on load: read the decoder's raw mode first
    try:
        with _strict_truncation():
            img.load()
    except Exception as e:  # noqa: BLE001  reported as a skip reason, never swallowed
        msg = str(e)
        reason = "truncated" if ("truncat" in msg.lower() or isinstance(e, EOFError)) else "corrupt"
        raise BadImageError(reason, f"{name}: pixel data does not decode ({type(e).__name__}: {msg})") from e
    try:
        rgb, converted_from = _to_rgb(img, raw)
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadImageError("unsupported_mode", f"{name}: mode {img.mode!r} does not convert to RGB ({e})") from e
    transpose = _EXIF_TRANSPOSE.get(_orientation(img))
    return (rgb.transpose(transpose) if transpose is not None else rgb), converted_from


# EXIF orientation tag value -> the transpose that shows the image upright
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1


def read_bytes(full: Path, name: str) -> bytes:
    try:
        return full.read_bytes()
    except FileNotFoundError as e:
        raise BadImageError("missing", f"{name}: no such file") from e
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise BadImageError("unreadable", f"{name}: cannot be read ({type(e).__name__}: {e})") from e


def load_rgb_file(path: str | os.PathLike, *, min_side: int = 1) -> tuple[Image.Image, str | None, str]:
    """Read and decode one file: ``(rgb_image, converted_from, sha256_of_bytes)``."""
    data = read_bytes(Path(path), str(path))
    img, conv = decode_rgb(data, name=str(path), min_side=min_side)
    return img, conv, sha256_bytes(data)


# ---------------------------------------------------------------------------------------
# metrics


def ssim_u8(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, 3) uint8 images (skimage, 7x7 uniform window, channels averaged)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def psnr(a: Any, b: Any, *, data_range: float = 1.0, max_db: float | None = None, per_sample: bool = False) -> Any:
    """PSNR in dB of two images (numpy arrays or torch tensors of one shape), the project's one PSNR.

    ``data_range``: 1.0 for [0, 1] images, 255 for uint8. Identical images give ``inf``, or
    ``max_db`` when given (a finite cap keeps means finite). numpy inputs are compared in
    float64, tensors in float32. ``per_sample``: one value per leading index (B, ...) as a
    list, else one value over the whole arrays. Evaluation tables use pyiqa's PSNR-Y instead
    (stage2/evaluate.py), the benchmarks' convention.
    """
    if isinstance(a, np.ndarray):
        diff = a.astype(np.float64) - np.asarray(b).astype(np.float64)
        sq = diff * diff
        mses = sq.reshape(sq.shape[0], -1).mean(axis=1).tolist() if per_sample else [float(sq.mean())]
    else:
        sq = (a.float() - b.float()) ** 2
        mses = sq.flatten(1).mean(dim=1).tolist() if per_sample else [float(sq.mean())]
    cap = float("inf") if max_db is None else float(max_db)
    vals = [cap if m == 0 else min(cap, 10.0 * math.log10(data_range**2 / m)) for m in mses]
    return vals if per_sample else vals[0]


# ---------------------------------------------------------------------------------------
# images and grids


def to_uint8(x: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (x.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # what shards and exports may hold


def encode_image(arr: np.ndarray, fmt: str = "png", *, quality: int = 95, compress_level: int = 6) -> bytes:
    """Encode an (H, W, 3) uint8 array as png / jpg / webp; the bytes are a pure function of the
    pixels (no metadata, no timestamps). The project's one image encoder."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"`format` = {fmt!r}: expected one of {sorted(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "png":
        img.save(buf, "PNG", compress_level=compress_level)
    elif fmt == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        img.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def encode_png(arr: np.ndarray, *, compress_level: int = 6, stored: bool = False) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array (Pillow, ``compress_level`` 0-9).

    ``stored``: no compression at all, and also (H, W) / 2- / 4-channel / uint16 arrays:
    bytes independent of the zlib behind Pillow, for data whose sha256s are committed (the
    demo data set); about 1.5x larger.
    """
    if stored:
        return _stored_png(arr)
    return encode_image(arr, "png", compress_level=compress_level)


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array at Pillow's default level (identical arrays, identical bytes)."""
    return encode_png(arr)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _deflate_stored(data: bytes) -> bytes:
    """A zlib stream of stored (uncompressed) blocks: the same bytes with any zlib build."""
    out = bytearray(b"\x78\x01")
    pos, n = 0, len(data)
    while True:
        block = data[pos : pos + 65535]
        pos += len(block)
        final = pos >= n
        out += bytes([1 if final else 0]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
        if final:
            break
    out += struct.pack(">I", zlib.adler32(data) & 0xFFFFFFFF)
    return bytes(out)


def _stored_png(arr: np.ndarray) -> bytes:
    """Uncompressed PNG of (H, W), (H, W, 2|3|4) uint8 / uint16 whose bytes depend only on the pixels."""
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"`arr` dtype {arr.dtype}: expected uint8 or uint16")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"`arr` shape {arr.shape}: expected (H, W) or (H, W, C) with C in 1..4")
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    depth = 8 if arr.dtype == np.uint8 else 16
    rows = np.ascontiguousarray(arr.astype(">u2") if depth == 16 else arr).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows.view(np.uint8).reshape(h, -1)], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", _deflate_stored(raw))
        + _png_chunk(b"IEND", b"")
    )


def image_grid(
    tiles: list[list[np.ndarray | None]],
    *,
    cell: int,
    pad: int = 2,
    labels: list[str] | None = None,
    col_labels: list[str] | None = None,
):
    """Tile rows of (H, W, 3) uint8 images (None = blank) into one PIL image, each fitted into ``cell`` px.

    ``labels`` (one per row) go in a left margin, ``col_labels`` (one per column) in a top
    margin, in PIL's default font.
    """
    from PIL import Image, ImageDraw

    rows = len(tiles)
    cols = max((len(r) for r in tiles), default=0)
    left = 8 + 6 * max(len(s) for s in labels) if labels else 0
    top = 14 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (cell + pad) + pad, top + rows * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels or []):
        draw.text((left + pad + c * (cell + pad) + 2, 2), text, fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        y = top + pad + r * (cell + pad)
        if labels:
            draw.text((4, y + cell // 2 - 5), labels[r], fill=(0, 0, 0))
        for c, arr in enumerate(row):
            if arr is None:
                continue
            im = Image.fromarray(arr)
            scale = cell / max(
                im.width, im.height
            )  # fit the cell: small samples are enlarged (nearest: pixels stay visible)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
            x = left + pad + c * (cell + pad)
            canvas.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
    return canvas


def save_png(path: str | os.PathLike, image) -> Path:
    """Atomically write a PIL image as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
