"""Demo data: deterministic, disjoint by source photo, committed manifests current, real degradations."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from d4ir_pipeline.data.manifests import build_manifest, load_manifest, open_pair, open_rgb, verify_manifest
from d4ir_pipeline.demo.data import (
    DEGRADED_WEATHERS,
    MANIFEST_NAMES,
    PHOTOS,
    SPLITS,
    add_rain,
    add_snow,
    build_demo_data,
    demo_data_command,
)

COMMITTED = Path(__file__).resolve().parents[1] / "data_manifests" / "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One seed-0 generation shared by the tests of this file (~5-10 s)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    return build_demo_data(out, seed=0)


def _records(out: Path) -> dict[str, list]:
    return {name: load_manifest(out / "manifests" / name) for name in MANIFEST_NAMES}


def _f(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64) / 255.0


def test_same_seed_gives_identical_bytes(demo, tmp_path):
    res = CliRunner().invoke(
        demo_data_command, ["--out", str(tmp_path / "again"), "--seed", "0", "--manifests-out", str(tmp_path / "copy")]
    )
    assert res.exit_code == 0, res.output
    assert "web-degraded" in res.output and "haze 96, rain 96, snow 96" in res.output
    for name in MANIFEST_NAMES:
        a = (demo.out / "manifests" / name).read_bytes()
        assert a == (tmp_path / "again" / "manifests" / name).read_bytes(), name
        assert a == (tmp_path / "copy" / name).read_bytes(), name
    assert (demo.out / "degradations.jsonl").read_bytes() == (tmp_path / "again" / "degradations.jsonl").read_bytes()
    # the manifests hash every file, and every file matches its manifest
    for name in MANIFEST_NAMES:
        assert verify_manifest(tmp_path / "again" / "manifests" / name, tmp_path / "again", progress=False).ok


def test_committed_manifests_match_seed_0(demo):
    for name in MANIFEST_NAMES:
        committed = COMMITTED / name
        assert committed.is_file(), f"{committed} missing"
        assert committed.read_bytes() == (demo.out / "manifests" / name).read_bytes(), (
            f"{committed} drifted from what seed 0 generates; regenerate with "
            "`d4ir demo-data --out runs/demo/data --manifests-out data_manifests/demo`"
        )


def test_splits_disjoint_by_source_photo(demo):
    recs = _records(demo.out)
    sources: dict[str, set[str]] = defaultdict(set)
    for rs in recs.values():
        for r in rs:
            sources[r.split].add(r.source)
    assert set(sources) == set(SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not sources[a] & sources[b], (a, b, sources[a] & sources[b])
    assert {p.name for p in PHOTOS} == set().union(*sources.values())
    # every clean/degraded image is pixel-distinct across splits too (no crop reused)
    shas = defaultdict(set)
    for rs in recs.values():
        for r in rs:
            shas[r.split] |= {r.sha256, r.target_sha256} - {None}
    assert sum(len(s) for s in shas.values()) == len(set().union(*shas.values()))


def test_layout_labels_and_balance(demo):
    recs = _records(demo.out)
    assert all(r.weather == "clean" and not r.paired for r in recs["web-clean.jsonl"])
    deg = recs["web-degraded.jsonl"]
    assert Counter(r.weather for r in deg) == {"rain": 96, "haze": 96, "snow": 96}
    assert not any(r.paired for r in deg)
    # each web-degraded photo spread evenly over the weathers: content does not predict weather
    per_photo = Counter((r.source, r.weather) for r in deg)
    assert len(set(per_photo.values())) == 1 and len(per_photo) == 3 * 3
    teacher = recs["teacher-train.jsonl"]
    assert Counter(r.weather for r in teacher) == {"rain": 64, "haze": 64, "snow": 64}
    assert all(r.paired and r.path.split("/")[2] == "input" and r.target.split("/")[2] == "target" for r in teacher)
    # test: the SAME clean targets under every weather, Rain100L/SOTS/Snow100K-like layout
    targets = {}
    for w in DEGRADED_WEATHERS:
        rs = recs[f"test-{w}.jsonl"]
        assert len(rs) == 20 and all(r.weather == w and r.split == "test" for r in rs)
        assert all(r.path.startswith(f"test/{w}/input/") and r.target.startswith(f"test/{w}/target/") for r in rs)
        assert all((r.width, r.height) == (128, 128) for r in rs)
        targets[w] = sorted((r.source, Path(r.target).name, r.target_sha256) for r in rs)
    assert targets["rain"] == targets["haze"] == targets["snow"]
    # `d4ir manifest build` on the generated test folder finds the same pairs
    m = demo.out.parent / "rebuilt.jsonl"
    build_manifest(demo.out / "test" / "rain", out=m, progress=False)
    rebuilt = sorted((r.sha256, r.target_sha256) for r in load_manifest(m))
    assert rebuilt == sorted((r.sha256, r.target_sha256) for r in recs["test-rain.jsonl"])


def test_degradations_are_measurable_on_test_pairs(demo):
    recs = _records(demo.out)
    psnr = {}
    for w in DEGRADED_WEATHERS:
        vals = []
        for r in recs[f"test-{w}.jsonl"]:
            inp, tgt = (_f(x) for x in open_pair(demo.out, r))
            vals.append(10 * math.log10(1.0 / ((inp - tgt) ** 2).mean()))
        psnr[w] = vals
        # visibly degraded, content still there (benchmark inputs sit around 10-25 dB)
        assert 6.0 < min(vals) and max(vals) < 30.0, (w, min(vals), max(vals))
    # haze: lower contrast, brighter dark channel (He et al.), stronger at the top (far)
    top, bottom = [], []
    for r in recs["test-haze.jsonl"]:
        inp, tgt = (_f(x) for x in open_pair(demo.out, r))
        li, lt = inp @ [0.299, 0.587, 0.114], tgt @ [0.299, 0.587, 0.114]
        gi, gt = np.hypot(*np.gradient(li)).mean(), np.hypot(*np.gradient(lt)).mean()
        assert gi < 0.85 * gt, r.id
        assert li.std() < lt.std(), r.id
        dark_i = ndimage.minimum_filter(inp.min(axis=2), size=7).mean()
        dark_t = ndimage.minimum_filter(tgt.min(axis=2), size=7).mean()
        assert dark_i > dark_t + 0.1, r.id
        resid = np.abs(inp - tgt).mean(axis=2)
        top.append(resid[:40].mean())
        bottom.append(resid[-40:].mean())
    assert np.mean(top) > np.mean(bottom)
    # rain and snow add light: inputs are never darker than the target beyond rounding
    for w in ("rain", "snow"):
        for r in recs[f"test-{w}.jsonl"]:
            inp, tgt = (_f(x) for x in open_pair(demo.out, r))
            if w == "rain":
                assert (inp >= tgt - 1.5 / 255).all(), r.id
            assert inp.mean() > tgt.mean() + 0.01, r.id


@pytest.mark.parametrize("angle", [-20.0, 0.0, 15.0])
def test_rain_streaks_follow_their_angle(angle):
    flat = np.full((96, 96, 3), 0.35)
    out, params = add_rain(flat, np.random.default_rng(3), angle=angle)
    streak = (out - flat).mean(axis=2)
    assert 0.01 < (streak > 8 / 255).mean() < 0.4  # sparse, like Rain100L

    def corr(a: float) -> float:  # correlation with itself shifted 6 px along direction `a`
        t = math.radians(a)
        sh = ndimage.shift(streak, (6 * math.cos(t), 6 * math.sin(t)), order=1, mode="grid-wrap")
        return float(np.corrcoef(streak.ravel(), sh.ravel())[0, 1])

    cands = np.arange(-45, 46)
    best = cands[int(np.argmax([corr(a) for a in cands]))]
    assert abs(best - angle) <= 6, (best, angle)  # streaks are oriented along the sampled angle
    assert corr(angle) > 0.3 > corr(angle + 90) + 0.2  # long along the streak, thin across


def test_snow_has_flakes_of_several_sizes():
    flat = np.full((128, 128, 3), 0.2)
    out, params = add_snow(flat, np.random.default_rng(5))
    assert (out >= flat - 1e-9).all() and out.mean() > flat.mean()
    labels, n = ndimage.label((out - flat).mean(axis=2) > 0.25)
    areas = np.bincount(labels.ravel())[1:]
    assert n >= 10
    assert areas.max() >= 5 * np.median(areas)  # near flakes are much larger than far ones
    assert len(params["layers"]) == 3


def test_rerun_reuses_verified_set_and_repairs_a_damaged_one(demo, tmp_path):
    out = tmp_path / "d"
    first = build_demo_data(out, seed=0)
    assert not first.reused
    again = build_demo_data(out, seed=0)
    assert again.reused and again.counts == first.counts
    victim = out / load_manifest(out / "manifests" / "web-clean.jsonl")[0].path
    good = victim.read_bytes()
    victim.write_bytes(b"")
    repaired = build_demo_data(out, seed=0)
    assert not repaired.reused and victim.read_bytes() == good
    assert open_rgb(out, victim.relative_to(out).as_posix()).size == (96, 96)
    assert not list(tmp_path.glob(".d.*"))  # no staging folders left behind
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("user data")
    with pytest.raises(Exception, match="not a demo-data folder"):
        build_demo_data(tmp_path / "foreign", seed=0)
