"""The shared plumbing in d4ir_pipeline/common: atomic folders, images, PSNR."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from d4ir_pipeline.common.io import atomic_dir


def test_atomic_dir_swaps_in_a_complete_folder_and_keeps_the_old_one_on_failure(tmp_path):
    out = tmp_path / "bank"
    with atomic_dir(out) as stage:
        (stage / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible before the block ends
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as stage:
            (stage / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "one"  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no staging folder left behind
    with atomic_dir(out) as stage:
        (stage / "b.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


@pytest.mark.skipif(os.name != "posix", reason="the liveness probe is POSIX-only")
def test_atomic_dir_removes_what_a_killed_build_of_the_same_folder_left(tmp_path):
    """A SIGKILLed build leaves its staging folder; the next build of that folder removes it, but never
    one whose process still runs, one of another host (a shared file system) or another folder's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left = {
        "dead": tmp_path / f".out.tmp-{host}-{dead.pid}",
        "running": tmp_path / f".out.tmp-{host}-{os.getppid()}",
        "other host": tmp_path / f".out.tmp-{host}x-{dead.pid}",
        "other folder": tmp_path / f".out2.tmp-{host}-{dead.pid}",
    }
    for stage in left.values():
        (stage / "partial").mkdir(parents=True)
    with atomic_dir(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("done")
    assert not left["dead"].exists()
    assert all(left[k].is_dir() for k in ("running", "other host", "other folder"))
    assert (tmp_path / "out" / "a.txt").read_text() == "done"


def test_the_one_psnr_agrees_across_numpy_torch_ranges_and_caps():
    import numpy as np
    import torch
    from skimage.metrics import peak_signal_noise_ratio

    from d4ir_pipeline.common.images import psnr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ref = peak_signal_noise_ratio(a, b, data_range=255)
    assert psnr(a, b, data_range=255.0) == pytest.approx(ref, abs=1e-9)
    ta, tb = torch.from_numpy(a).float() / 255, torch.from_numpy(b).float() / 255
    assert psnr(ta, tb) == pytest.approx(ref, abs=1e-4)  # float32 on tensors, same value
    per = psnr(a, b, data_range=255.0, per_sample=True)
    assert len(per) == 2 and per[0] == pytest.approx(peak_signal_noise_ratio(a[0], b[0], data_range=255), abs=1e-9)
    assert psnr(ta, tb, per_sample=True) == pytest.approx(per, abs=1e-4)
    assert psnr(a, a) == float("inf") and psnr(a, a, max_db=100.0) == 100.0
    assert psnr(ta, ta, per_sample=True, max_db=60.0) == [60.0, 60.0]


def test_stored_png_round_trips_every_mode_with_stable_bytes():
    import io

    import numpy as np
    from PIL import Image

    from d4ir_pipeline.common.images import encode_png

    rng = np.random.default_rng(0)
    for arr in (
        (rng.random((5, 7, 3)) * 255).astype(np.uint8),
        (rng.random((5, 7)) * 255).astype(np.uint8),
        (rng.random((5, 7, 4)) * 255).astype(np.uint8),
        (rng.random((5, 7)) * 65535).astype(np.uint16),
        (rng.random((300, 300, 3)) * 255).astype(np.uint8),  # > 64 KiB: several stored blocks
    ):
        data = encode_png(arr, stored=True)
        assert data == encode_png(arr.copy(), stored=True)
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(back, arr), arr.shape


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encoding_is_deterministic(fmt):
    import io

    import numpy as np
    from PIL import Image

    from d4ir_pipeline.common.images import encode_image

    arr = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    a, b = encode_image(arr, fmt), encode_image(arr.copy(), fmt)
    assert a == b and len(a) > 0
    back = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"))
    if fmt == "png":
        assert (back == arr).all()
