"""`d4ir restore`: bad and odd inputs, tiles without seams, batching, resume, refused output folders."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from d4ir_pipeline.cli import main as cli_main
from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.data.manifests import ImageRecord, write_manifest
from d4ir_pipeline.deploy import EXIT_CODES, ModelConfig, RestoreConfig, load_runner
from d4ir_pipeline.deploy import restore as restore_mod
from d4ir_pipeline.deploy.budget import Plan
from d4ir_pipeline.deploy.runner import probe_image
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, save_model
from d4ir_pipeline.models.tiling import blend_ramp

REPO = Path(__file__).resolve().parent.parent
LOCAL = "d4ir_pipeline.models.students:LocalCNN"


def local_cnn(tmp: Path, layers: int = 3, seed: int = 0) -> Path:
    """A fully convolutional model (receptive-field radius = layers px) saved as a model folder."""
    torch.manual_seed(seed)
    return save_model(build_model(LOCAL, width=8, layers=layers), tmp / f"local{layers}")


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def odd_folder(root: Path) -> Path:
    """Good, convertible and broken inputs side by side, as a photo folder holds them."""
    (root / "trip" / "day2").mkdir(parents=True)
    Image.fromarray(_rgb(40, 52, 0)).save(root / "a.png")
    Image.fromarray(_rgb(33, 47, 1)).save(root / "trip" / "b.jpg", quality=95)
    Image.fromarray(_rgb(40, 52, 2)).save(root / "trip" / "day2" / "c.png")  # same size as a.png: one batch
    Image.fromarray(np.random.default_rng(3).integers(0, 65536, (30, 41)).astype(np.uint16)).save(root / "g16.png")
    assert Image.open(root / "g16.png").mode.startswith("I;16")
    Image.new("CMYK", (37, 29), (20, 80, 160, 10)).save(root / "cmyk.jpg")
    Image.fromarray(_rgb(31, 27, 4)[:, :, 0], mode="L").save(root / "grey.png")
    Image.fromarray(_rgb(150, 171, 5)).save(root / "big.png")  # larger than the 64 px tile
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64, 6)).save(buf, format="JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated JPEG
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")  # hidden files are not inputs
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_folder_with_odd_and_broken_images_restores_the_good_ones_and_explains_the_rest(tmp_path):
    src = odd_folder(tmp_path / "in")
    out = tmp_path / "out"
    cfg = RestoreConfig(input=str(src), out=str(out), model=ModelConfig(checkpoint=str(local_cnn(tmp_path))),
                        tile=64, tile_overlap=16, progress=False, sheet=True)  # fmt: skip
    r = restore_mod.restore(cfg)
    good = {"a.png": (40, 52), "trip/b.png": (33, 47), "trip/day2/c.png": (40, 52), "g16.png": (30, 41),
            "cmyk.png": (29, 37), "grey.png": (31, 27), "big.png": (150, 171)}  # fmt: skip
    for rel, (h, w) in good.items():
        img = Image.open(out / rel)
        assert img.mode == "RGB" and img.size == (w, h), rel
    assert {s["input"]: s["reason"] for s in r.skipped} == {"cut.jpg": "truncated", "empty.png": "empty"}
    assert r.exit_code == 1 and r.restored == 7 and r.written == 7 and r.not_images == ["notes.txt"]
    summary = json.loads(r.summary_path.read_text())
    by_input = {x["input"]: x for x in summary["restored"]}
    assert by_input["cmyk.jpg"]["converted_from"] == "CMYK"
    assert by_input["g16.png"]["converted_from"].startswith("I;16")
    assert by_input["grey.png"]["converted_from"] == "L"
    assert by_input["big.png"]["tiled"] == 64 and by_input["a.png"]["tiled"] is None
    assert summary["counts"] == {"inputs": 9, "restored": 7, "skipped": 2, "converted": 3, "tiled": 1, "not_images": 1}
    assert summary["exit_code"] == 1 and summary["exit_codes"]["1"] == EXIT_CODES[1]
    assert Image.open(r.sheet_path).size[1] == 7 * 192 + 6 * 8  # input | output rows

    # the rerun: nothing is written, not even the summary or the sheet
    before = snapshot(out)
    again = restore_mod.restore(cfg)
    assert again.written == 0 and again.restored == 7 and again.exit_code == 1
    assert snapshot(out) == before

    # a changed input is redone, and only it
    Image.fromarray(_rgb(40, 52, 9)).save(src / "a.png")
    third = restore_mod.restore(cfg)
    assert third.written == 1
    changed = {k for k, v in snapshot(out).items() if before.get(k) != v}
    assert {"a.png", "restore-log.jsonl", "restore-sheet.png"} <= changed <= {"a.png", "restore-log.jsonl",
                                                                              "restore-sheet.png"}  # fmt: skip


def test_outputs_match_the_model_run_directly(tmp_path):
    model_dir = local_cnn(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    arr = _rgb(37, 53, 0)
    Image.fromarray(arr).save(src / "x.png")
    r = restore_mod.restore(RestoreConfig(input=str(src / "x.png"), out=str(tmp_path / "out"),
                                          model=ModelConfig(checkpoint=str(model_dir)), progress=False))  # fmt: skip
    assert r.exit_code == 0 and r.restored == 1
    runner = load_runner(ModelConfig(checkpoint=str(model_dir)), device="cpu")
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    want = (runner(x)[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), want)


def test_tiled_output_equals_whole_image_and_shows_no_seam(tmp_path):
    x = torch.rand(1, 3, 160, 203, generator=torch.Generator().manual_seed(0))
    tile, overlap = 64, 16
    # receptive-field radius 3 <= overlap // 4: tiles see everything the whole image does
    runner = load_runner(ModelConfig(checkpoint=str(local_cnn(tmp_path, layers=3))), device="cpu")
    whole = runner(x)
    tiled = restore_mod.run_model(runner, x, Plan(tile=tile, batch=1), overlap)
    assert (tiled - whole.clamp(0, 1))[..., 8:-8, 8:-8].abs().max().item() <= 1e-5

    # radius 12 > overlap // 4: tiles no longer see all the context; blended, the error stays small and smooth
    deep = load_runner(ModelConfig(checkpoint=str(local_cnn(tmp_path, layers=12))), device="cpu")
    photo = probe_image(160, 203)  # smooth, so a step in the error can only come from a tile border
    ref = deep(photo).clamp(0, 1)
    blended = restore_mod.run_model(deep, photo, Plan(tile=tile, batch=1), overlap)
    naive = torch.zeros_like(ref)  # hard-cut tiles (no overlap, no blending): what a seam looks like
    for y0 in range(0, 160, tile):
        for x0 in range(0, 203, tile):
            naive[..., y0 : y0 + tile, x0 : x0 + tile] = deep(photo[..., y0 : y0 + tile, x0 : x0 + tile]).clamp(0, 1)

    def jump(img: torch.Tensor) -> float:
        d = img - ref  # largest step of the error between neighbouring pixels
        return max(d.diff(dim=-1).abs().max().item(), d.diff(dim=-2).abs().max().item())

    assert 0 < (blended - ref).abs().max().item() <= 1e-3
    assert jump(naive) > 0.01 and jump(blended) <= 0.01 * jump(naive), (jump(blended), jump(naive))
    assert blend_ramp(tile, overlap, ramp_start=True, ramp_end=True)[: overlap // 4].sum() == 0


def test_same_size_images_are_batched_and_large_ones_tiled(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_rgb(24, 32, i)).save(src / f"s{i}.png")
    Image.fromarray(_rgb(90, 100, 9)).save(src / "large.png")
    calls: list[tuple[int, ...]] = []
    real = restore_mod.load_runner

    def counting(*args, **kwargs):
        runner = real(*args, **kwargs)
        fn = runner.fn

        def wrapped(x):
            calls.append(tuple(x.shape))
            return fn(x)

        runner.fn = wrapped
        return runner

    monkeypatch.setattr(restore_mod, "load_runner", counting)
    cfg = RestoreConfig(input=str(src), out=str(tmp_path / "out"), model=ModelConfig(checkpoint=str(local_cnn(tmp_path))),
                        batch_size=4, tile=64, progress=False)  # fmt: skip
    r = restore_mod.restore(cfg)
    assert r.exit_code == 0 and r.restored == 6
    small = [c for c in calls if c[2:] == (24, 32)]
    assert sorted(c[0] for c in small) == [1, 4]  # 5 images of one size: a batch of 4, then 1
    tiles = [c for c in calls if c[2:] != (24, 32)]
    assert len(tiles) >= 4 and all(c[0] == 1 and max(c[2:]) <= 64 for c in tiles)


def test_memory_budget_decides_the_tiles(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(200, 230, 0)).save(src / "photo.png")
    torch.manual_seed(0)
    model = ModelConfig(checkpoint=str(save_model(build_model("nafnet_s"), tmp_path / "nafnet_s")))
    bpp = load_runner(model, device="cpu").bytes_per_pixel  # measured: 320 B/px (in-place NAFNet inference)
    assert 200 * 230 * bpp > 11 * 2**20 > 184 * 184 * bpp
    r = restore_mod.restore(RestoreConfig(input=str(src), out=str(tmp_path / "o"), model=model, memory_mb=11,
                                          progress=False))  # fmt: skip
    assert json.loads(r.summary_path.read_text())["restored"][0]["tiled"] == 184
    r = restore_mod.restore(RestoreConfig(input=str(src), out=str(tmp_path / "o2"), model=model, progress=False))
    assert json.loads(r.summary_path.read_text())["restored"][0]["tiled"] is None  # 2048 MiB: whole image


def test_manifest_input_mirrors_record_paths_and_reports_changed_files(tmp_path):
    root = tmp_path / "root"
    (root / "test" / "rain").mkdir(parents=True)
    recs = []
    for i in range(3):
        p = root / "test" / "rain" / f"im{i}.png"
        Image.fromarray(_rgb(20, 24, i)).save(p)
        recs.append(ImageRecord(id=f"r{i}", path=f"test/rain/im{i}.png", url=None, sha256=sha256_file(p), width=24,
                                height=20, weather="rain", split="test"))  # fmt: skip
    recs.append(ImageRecord(id="web", path=None, url="http://example.invalid/x.png", sha256="0" * 64, width=8,
                            height=8, weather=None, split="test"))  # fmt: skip
    manifest = write_manifest(tmp_path / "m.jsonl", recs)
    Image.fromarray(_rgb(20, 24, 7)).save(root / "test" / "rain" / "im2.png")  # no longer what the manifest says
    out = tmp_path / "out"
    cfg = RestoreConfig(input=str(manifest), root=str(root), out=str(out),
                        model=ModelConfig(checkpoint=str(local_cnn(tmp_path))), progress=False)  # fmt: skip
    r = restore_mod.restore(cfg)
    assert (out / "test" / "rain" / "im0.png").is_file() and (out / "test" / "rain" / "im1.png").is_file()
    assert {s["input"]: s["reason"] for s in r.skipped} == {"test/rain/im2.png": "changed", "web": "no_path"}
    with pytest.raises(D4IRError, match="give `root`"):
        restore_mod.restore(RestoreConfig(input=str(manifest), out=str(out), model=cfg.model))


def test_output_folder_inside_the_input_is_refused(tmp_path):
    src = odd_folder(tmp_path / "in")
    model = ModelConfig(checkpoint=str(local_cnn(tmp_path)))
    for bad in (src, src / "restored", src / "trip" / "x"):
        with pytest.raises(D4IRError, match="input folder"):
            restore_mod.restore(RestoreConfig(input=str(src), out=str(bad), model=model, progress=False))
    assert not (src / "restored").exists() and not (src / "trip" / "x").exists()


def test_outputs_of_another_model_are_not_mixed_in(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(16, 16, 0)).save(src / "a.png")
    out = str(tmp_path / "out")
    first = ModelConfig(checkpoint=str(local_cnn(tmp_path, seed=0)))
    restore_mod.restore(RestoreConfig(input=str(src), out=out, model=first, progress=False))
    other = ModelConfig(checkpoint=str(save_model(build_model(LOCAL, width=8, layers=2), tmp_path / "other")))
    with pytest.raises(D4IRError, match="another model"):
        restore_mod.restore(RestoreConfig(input=str(src), out=out, model=other, progress=False))
    r = restore_mod.restore(RestoreConfig(input=str(src), out=out, model=other, progress=False, overwrite=True))
    assert r.written == 1


def test_cli_exit_codes_are_the_documented_ones(tmp_path):
    src = odd_folder(tmp_path / "in")
    model = str(local_cnn(tmp_path))
    res = CliRunner().invoke(cli_main, ["restore", str(src), "--model", model, "--out", str(tmp_path / "o"),
                                        "--tile", "64"])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "skipped cut.jpg: truncated" in res.output and "exit code 1" in res.output
    ok = tmp_path / "ok"
    ok.mkdir()
    Image.fromarray(_rgb(16, 20, 0)).save(ok / "a.png")
    res = CliRunner().invoke(cli_main, ["restore", str(ok), "--model", model, "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "d4ir_pipeline.cli", "restore", str(ok), "--model", model, "--out",
                           str(ok / "sub")], capture_output=True, text=True, env=env, check=False)  # fmt: skip
    assert proc.returncode == 2 and "inside the input folder" in proc.stderr


def test_an_image_above_pillows_pixel_limit_is_skipped_with_its_reason(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(60, 70, 0)).save(src / "huge.png")
    Image.fromarray(_rgb(20, 20, 1)).save(src / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 70 = 4200 pixels: a "decompression bomb" now
    r = restore_mod.restore(RestoreConfig(input=str(src), out=str(tmp_path / "out"),
                                          model=ModelConfig(checkpoint=str(local_cnn(tmp_path))), progress=False))  # fmt: skip
    assert [(s["input"], s["reason"]) for s in r.skipped] == [("huge.png", "decompression_bomb")]
    assert r.restored == 1 and r.exit_code == 1
