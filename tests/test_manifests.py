"""Manifests: records, build on good + every kind of bad file, conversions, paired layouts, verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile

from d4ir_pipeline.common.images import decode_rgb, encode_png
from d4ir_pipeline.data.manifests import (
    ImageRecord,
    ManifestError,
    StrictBuildError,
    build_manifest,
    load_manifest,
    load_rgb_checked,
    manifest_group,
    open_pair,
    open_rgb,
    skipped_path,
    verify_manifest,
    weather_from_path,
    write_manifest,
)
from d4ir_pipeline.errors import BadImageError

stored_png = partial(encode_png, stored=True)  # any mode, reproducible bytes
RNG = np.random.default_rng(0)


def _rgb(h: int = 40, w: int = 48) -> np.ndarray:
    return (RNG.random((h, w, 3)) * 255).astype(np.uint8)


def _save(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions (a bomb) without the bytes to back them."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


@pytest.fixture()
def mixed_tree(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str], dict[str, str]]:
    """good images (some needing conversion) + one file of every bad kind.

    Returns (root, good relpath -> expected weather, bad relpath -> reason, converted relpath -> mode).
    """
    root = tmp_path / "web"
    good: dict[str, str | None] = {}
    conv: dict[str, str] = {}
    bad: dict[str, str] = {}
    a = _rgb()
    _save(root / "rain" / "r1.png", Image.fromarray(a), "PNG")
    good["rain/r1.png"] = "rain"
    _save(root / "Foggy" / "h1.jpg", Image.fromarray(_rgb()), "JPEG", quality=90)
    good["Foggy/h1.jpg"] = "haze"
    _save(root / "Snow100K-L" / "nested" / "s1.webp", Image.fromarray(_rgb()), "WEBP")
    good["Snow100K-L/nested/s1.webp"] = "snow"
    _save(root / "unlabelled" / "u1.bmp", Image.fromarray(_rgb()), "BMP")
    good["unlabelled/u1.bmp"] = None
    # modes that must be converted to 8-bit RGB
    c = root / "clean"
    _save(c / "cmyk.jpg", Image.fromarray(_rgb()).convert("CMYK"), "JPEG")
    _save(c / "gray.png", Image.fromarray(_rgb()).convert("L"), "PNG")
    _save(c / "pal.png", Image.fromarray(_rgb()).convert("P"), "PNG")
    _save(c / "rgba.png", Image.fromarray(np.dstack([_rgb(), np.full((40, 48), 128, np.uint8)])), "PNG")
    _save(c / "la.png", Image.fromarray(_rgb()).convert("LA"), "PNG")
    (c / "g16.png").write_bytes(stored_png((RNG.random((40, 48)) * 65535).astype(np.uint16)))
    (c / "rgb16.png").write_bytes(stored_png((RNG.random((40, 48, 3)) * 65535).astype(np.uint16)))
    _save(c / "float.tif", Image.fromarray(RNG.random((40, 48)).astype(np.float32), mode="F"), "TIFF")
    conv.update(
        {
            "clean/cmyk.jpg": "CMYK",
            "clean/gray.png": "L",
            "clean/pal.png": "P",
            "clean/rgba.png": "RGBA",
            "clean/la.png": "LA",
            "clean/g16.png": "I;16",
            "clean/rgb16.png": "RGB;16",
            "clean/float.tif": "F",
        }
    )
    for rel in conv:
        good[rel] = "clean"
    # every kind of bad file
    b = root / "bad"
    b.mkdir(parents=True)
    (b / "empty.png").write_bytes(b"")
    bad["bad/empty.png"] = "empty"
    png = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(png, "PNG")
    (b / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    bad["bad/cut.png"] = "truncated"
    jpg = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(jpg, "JPEG")
    (b / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    bad["bad/cut.jpg"] = "truncated"
    (b / "notes.png").write_text("this is a text file with an image name\n")
    bad["bad/notes.png"] = "not_image"
    (b / "bomb.png").write_bytes(_huge_png_header(40000, 40000))  # 1.6e9 px > PIL's default limit
    bad["bad/bomb.png"] = "decompression_bomb"
    _save(b / "tiny.png", Image.fromarray(_rgb(8, 30)), "PNG")
    bad["bad/tiny.png"] = "too_small"
    (root / "README.txt").write_text("not an image extension: ignored, not skipped\n")
    (root / ".hidden.png").write_bytes(b"")  # hidden files are not scanned
    return root, good, bad, conv


def test_build_records_good_and_lists_every_bad(mixed_tree, tmp_path):
    root, good, bad, conv = mixed_tree
    out = tmp_path / "m" / "web.jsonl"
    res = CliRunner().invoke(manifest_group, ["build", str(root), "--out", str(out), "--min-side", "16"])
    assert res.exit_code == 0, res.output
    recs = load_manifest(out)
    by_path = {r.path: r for r in recs}
    assert sorted(by_path) == sorted(good)  # every good image once, nothing else
    assert len(recs) == len(good)
    for rel, weather in good.items():
        r = by_path[rel]
        assert r.sha256 == _sha(root / rel), rel
        assert r.weather == weather, rel
        assert (r.width, r.height) == (48, 40), rel
        assert r.split == rel.split("/")[0]
    skipped = [json.loads(line) for line in skipped_path(out).read_text().splitlines()]
    assert {s["path"]: s["reason"] for s in skipped} == bad
    assert all(s["message"] for s in skipped)
    # summary line: recorded / skipped by reason / converted by mode
    summary = res.output.splitlines()[0]
    assert summary.startswith(f"recorded {len(good)}; skipped {len(bad)} (")
    for reason, n in Counter(bad.values()).items():
        assert f"{reason} {n}" in summary
    assert f"converted {len(conv)} (" in summary
    for mode in conv.values():
        assert f"{mode} 1" in summary
    assert "ignored 1 non-image files" in summary


def test_build_strict_exits_nonzero_and_writes_no_manifest(mixed_tree, tmp_path):
    root, _, bad, _ = mixed_tree
    out = tmp_path / "strict.jsonl"
    res = CliRunner().invoke(manifest_group, ["build", str(root), "--out", str(out), "--min-side", "16", "--strict"])
    assert res.exit_code != 0
    assert not out.exists()
    assert len(skipped_path(out).read_text().splitlines()) == len(bad)
    with pytest.raises(StrictBuildError) as ei:
        build_manifest(root, out=out, min_side=16, strict=True, progress=False)
    assert ei.value.result.skipped_total == len(bad)
    # strict on a clean tree succeeds
    clean = tmp_path / "ok"
    _save(clean / "a.png", Image.fromarray(_rgb()), "PNG")
    res = CliRunner().invoke(manifest_group, ["build", str(clean), "--out", str(out), "--strict"])
    assert res.exit_code == 0, res.output
    assert len(load_manifest(out)) == 1


def test_decompression_bomb_uses_pils_limit(monkeypatch, tmp_path):
    data = stored_png(_rgb(60, 60))  # 3600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # > limit: Pillow warns, we refuse
    with pytest.raises(BadImageError) as ei:
        decode_rgb(data)
    assert ei.value.reason == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x limit: Pillow raises
    with pytest.raises(BadImageError) as ei:
        decode_rgb(data)
    assert ei.value.reason == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    assert decode_rgb(data)[0].size == (60, 60)


def test_truncation_detected_even_if_a_library_allows_truncated_images(monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError) as ei:
        decode_rgb(buf.getvalue()[:-400])
    assert ei.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_conversions_are_correct():
    # 16-bit: v / 257 with rounding, not clipping to the low byte
    g16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    img, conv = decode_rgb(stored_png(g16))
    assert conv == "I;16" and img.mode == "RGB"
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]
    # RGBA: composite on white, fully transparent -> white, opaque -> unchanged
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    img, conv = decode_rgb(stored_png(rgba))
    assert conv == "RGBA"
    px = np.asarray(img)[0]
    assert px[0].tolist() == [255, 255, 255] and px[1].tolist() == [10, 20, 30]
    assert 120 <= px[2][0] <= 135  # half-transparent black over white -> mid grey
    # palette with a transparent index -> composited
    p = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    img, conv = decode_rgb(buf.getvalue())
    assert conv == "P" and np.asarray(img)[0].tolist() == [[255, 255, 255], [200, 10, 10]]
    # plain RGB: no conversion reported
    assert decode_rgb(stored_png(_rgb()))[1] is None


def test_exif_orientation_applied():
    buf = io.BytesIO()
    img = Image.fromarray(_rgb(20, 40))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(buf, "JPEG", exif=exif.tobytes())
    out, _ = decode_rgb(buf.getvalue())
    assert out.size == (20, 40)


def test_path_escape_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(stored_png(_rgb()))
    for rel in ("../outside.png", str(outside)):
        with pytest.raises(BadImageError) as ei:
            open_rgb(root, rel)
        assert ei.value.reason == "escapes_root"
    with pytest.raises(ManifestError, match="relative POSIX path"):
        ImageRecord.from_dict(
            {"id": "x", "path": "../outside.png", "sha256": "0" * 64, "width": 1, "height": 1, "split": "s"},
            where="m.jsonl:3",
        )
    if hasattr(os, "symlink"):
        os.symlink(outside, root / "link.png")
        with pytest.raises(BadImageError) as ei:
            open_rgb(root, "link.png")
        assert ei.value.reason == "escapes_root"
        res = build_manifest(root, out=tmp_path / "m.jsonl", progress=False)
        assert res.recorded == 0 and res.skipped == {"escapes_root": 1}


def test_records_validate_and_name_the_line(tmp_path):
    good = {
        "id": "a",
        "path": "a.png",
        "url": None,
        "sha256": "a" * 64,
        "width": 4,
        "height": 5,
        "weather": "rain",
        "split": "s",
        "source": None,
    }
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(good) + "\n" + json.dumps({**good, "weather": "sunny"}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: `weather` = 'sunny'.*rain"):
        load_manifest(m)
    m.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        load_manifest(m)
    m.write_text(json.dumps({**good, "wether": "rain"}) + "\n")
    with pytest.raises(ManifestError, match="did you mean 'weather'"):
        load_manifest(m)
    m.write_text(json.dumps({**good, "width": "4"}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: `width` = '4' \(str\)"):
        load_manifest(m)
    m.write_text(json.dumps({**good, "target": "t.png"}) + "\n")
    with pytest.raises(ManifestError, match="go together"):
        load_manifest(m)
    # round trip; write order is by id whatever the input order
    r1 = ImageRecord.from_dict(good)
    r2 = ImageRecord.from_dict({**good, "id": "0", "target": "t.png", "target_sha256": "b" * 64})
    write_manifest(m, [r1, r2])
    lines = m.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["0", "a"]
    assert "target" not in json.loads(lines[1]) and list(json.loads(lines[0])) == sorted(json.loads(lines[0]))
    assert load_manifest(m) == [r2, r1]


def test_weather_from_folder_names():
    assert weather_from_path(["Rain100L", "input"]) == "rain"
    assert weather_from_path(["SOTS", "outdoor", "hazy"]) == "haze"
    assert weather_from_path(["snowy"]) == "snow"
    assert weather_from_path(["clean", "hazy"]) == "haze"  # innermost wins
    assert weather_from_path(["photos", "2024"]) is None


def test_paired_layouts(tmp_path):
    root = tmp_path / "bench"

    def pair(inp: str, tgt: str, size=(40, 48), tsize=None, fmt="PNG"):
        t = _rgb(*size)
        _save(root / tgt, Image.fromarray(t if tsize is None else _rgb(*tsize)), "PNG")
        _save(root / inp, Image.fromarray(np.clip(t.astype(int) + 30, 0, 255).astype(np.uint8)), fmt)

    pair("Rain100L/rain/rain-001.png", "Rain100L/norain/norain-001.png")  # Rain100L names
    pair("SOTS/outdoor/hazy/0001_0.8_0.2.jpg", "SOTS/outdoor/gt/0001.png", fmt="JPEG")  # SOTS names
    _save(root / "SOTS/outdoor/hazy/0001_0.9_0.1.png", Image.fromarray(_rgb()), "PNG")  # same gt, another hazy
    pair("Snow100K/synthetic/beautiful_1.jpg", "Snow100K/gt/beautiful_1.jpg", fmt="JPEG")
    _save(root / "Snow100K/mask/beautiful_1.jpg", Image.fromarray(_rgb()), "JPEG")  # masks: not images to record
    pair("test/rain/input/a.png", "test/rain/target/a.png")
    pair("test/rain/input/b.png", "test/rain/target/b.png", tsize=(40, 40))  # size mismatch
    _save(root / "test/rain/input/c.png", Image.fromarray(_rgb()), "PNG")  # no target
    _save(root / "test/rain/target/orphan.png", Image.fromarray(_rgb()), "PNG")  # no input
    _save(root / "test/rain/input/d.png", Image.fromarray(_rgb()), "PNG")
    (root / "test/rain/target/d.png").write_bytes(b"")  # bad target
    res = build_manifest(root, out=tmp_path / "b.jsonl", progress=False)
    recs = {r.path: r for r in load_manifest(tmp_path / "b.jsonl")}
    assert {p: (r.target, r.weather) for p, r in recs.items()} == {
        "Rain100L/rain/rain-001.png": ("Rain100L/norain/norain-001.png", "rain"),
        "SOTS/outdoor/hazy/0001_0.8_0.2.jpg": ("SOTS/outdoor/gt/0001.png", "haze"),
        "SOTS/outdoor/hazy/0001_0.9_0.1.png": ("SOTS/outdoor/gt/0001.png", "haze"),
        "Snow100K/synthetic/beautiful_1.jpg": ("Snow100K/gt/beautiful_1.jpg", "snow"),
        "test/rain/input/a.png": ("test/rain/target/a.png", "rain"),
    }
    for r in recs.values():
        assert r.target_sha256 == _sha(root / r.target)
        inp, tgt = open_pair(root, r, check_hash=True)
        assert inp.size == tgt.size == (48, 40)
    assert res.paired == 5
    skipped = {json.loads(x)["path"]: json.loads(x)["reason"] for x in skipped_path(tmp_path / "b.jsonl").open()}
    assert skipped == {
        "test/rain/input/b.png": "size_mismatch",
        "test/rain/input/c.png": "no_target",
        "test/rain/input/d.png": "bad_target",
        "test/rain/target/orphan.png": "unpaired_target",
    }


def test_verify_detects_drift(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _save(root / "rain" / f"{i}.png", Image.fromarray(_rgb()), "PNG")
    m = tmp_path / "m.jsonl"
    build_manifest(root, out=m, progress=False)
    runner = CliRunner()
    ok = runner.invoke(manifest_group, ["verify", str(m), "--root", str(root)])
    assert ok.exit_code == 0, ok.output
    assert "checked 3 files: 0 missing, 0 changed" in ok.output
    _save(root / "rain" / "1.png", Image.fromarray(_rgb()), "PNG")  # same name, new content
    (root / "rain" / "2.png").unlink()
    res = verify_manifest(m, root, progress=False)
    assert not res.ok and res.changed == ["rain/1.png"] and res.missing == ["rain/2.png"]
    bad = runner.invoke(manifest_group, ["verify", str(m), "--root", str(root)])
    assert bad.exit_code == 1
    assert "changed: rain/1.png" in bad.output and "missing: rain/2.png" in bad.output
    # open with check_hash also sees the change
    rec = next(r for r in load_manifest(m) if r.path == "rain/1.png")
    with pytest.raises(BadImageError) as ei:
        load_rgb_checked(root, rec, check_hash=True)
    assert ei.value.reason == "changed"


def test_build_is_deterministic(mixed_tree, tmp_path):
    root, *_ = mixed_tree
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_manifest(root, out=a, min_side=16, progress=False)
    build_manifest(root, out=b, min_side=16, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert skipped_path(a).read_bytes() == skipped_path(b).read_bytes()


def test_corrupted_bytes_never_crash():
    """Random byte damage in every format gives an image or a BadImageError, nothing else."""
    rng = np.random.default_rng(1)
    reasons = Counter()
    for fmt in ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(_rgb(24, 24)).save(buf, fmt)
        data = bytearray(buf.getvalue())
        for _ in range(15):
            bad = bytearray(data)
            for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 6))):
                bad[pos] = int(rng.integers(0, 256))
            cut = bytes(bad[: int(rng.integers(len(bad) // 3, len(bad) + 1))])
            try:
                img, _ = decode_rgb(cut)
                assert img.mode == "RGB"
                reasons["ok"] += 1
            except BadImageError as e:
                reasons[e.reason] += 1
    assert reasons["ok"] < sum(reasons.values())  # the damage was real
