"""The shared plumbing in d4ir_pipeline/common: atomic folders, images, PSNR."""

from __future__ import annotations

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
