"""CCD, one batch: keys, seeds, per-sample decisions, crops, and the batched img2img with retries."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.ccd import (
    CCD,
    CCDInput,
    decide_sample,
    denoise_steps,
    normalise_mix,
    prepare_image,
    sample_key,
    sample_seed,
)

K, D = 4, 32  # tiny SD: text width 32
PX = 32  # 16x16 latents: the tiny UNet runs them 4x faster than its native 64 px


def test_keys_are_webdataset_safe_and_unique():
    ids = ["web-clean/astronaut-003", "web clean/astronaut.003", "web-clean/astronaut_003", "a" * 300, "ü/ß.png"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(keys)  # ids that sanitise alike stay apart (hash suffix)
    for k in keys:
        assert "." not in k and "/" not in k and len(k) < 100, k
    assert sample_key("x", 1) != sample_key("x", 0)
    assert sample_key("web-clean/astronaut-003") == sample_key("web-clean/astronaut-003")


def test_seed_is_a_function_of_global_seed_key_and_attempt():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    seeds = {sample_seed(0, "a"), sample_seed(1, "a"), sample_seed(0, "b"), sample_seed(0, "a", attempt=1)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def _decide(key, mix, strength=0.5, steps=10, use="entry"):
    weathers, probs = normalise_mix(mix, ("rain", "haze", "snow"))
    rows_for = {"rain": [0, 1], "haze": [2], "snow": [3, 4]}
    return decide_sample(
        key,
        global_seed=7,
        weathers=weathers,
        probs=probs,
        rows_for=rows_for,
        row_ids=[f"id{i}" for i in range(5)],
        use=use,
        strength=strength,
        steps=steps,
    )


def test_weather_mix_ratios_and_prompt_choice():
    decs = [_decide(f"k{i}", {"rain": 3.0, "haze": 1.0, "snow": 0.0}) for i in range(2000)]
    counts = {w: sum(d.weather == w for d in decs) for w in ("rain", "haze", "snow")}
    assert counts["snow"] == 0
    assert abs(counts["rain"] / 2000 - 0.75) < 0.04, counts
    rain_rows = {d.row for d in decs if d.weather == "rain"}
    assert rain_rows == {0, 1}  # entries are drawn from the weather's own rows only
    assert all(d.prompt_id == f"id{d.row}" for d in decs)
    cent = _decide("k1", {}, use="centroid")
    assert cent.row is None and cent.prompt_id == f"centroid/{cent.weather}"
    assert _decide("k5", {}) == _decide("k5", {})  # a pure function of (seed, key)
    with pytest.raises(D4IRError, match="fog"):
        normalise_mix({"fog": 1.0}, ("rain",))


def test_strength_range_is_quantised_to_whole_steps():
    decs = [_decide(f"k{i}", {}, strength=(0.3, 0.6), steps=10) for i in range(200)]
    assert {d.denoise for d in decs} <= {3, 4, 5, 6}
    assert len({d.denoise for d in decs}) > 1
    assert all(d.strength == d.denoise / 10 for d in decs)
    assert denoise_steps(0.5, 30) == 15 and denoise_steps(0.01, 30) == 1 and denoise_steps(1.0, 30) == 30
    with pytest.raises(ValueError, match="strength"):
        denoise_steps(0.0, 10)


def test_prepare_image_resizes_short_side_and_crops():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
    out, box = prepare_image(img, 32, "center")
    assert out.size == (32, 32)
    assert box == (10, 0, 42, 32)  # 100x60 -> 53x32, centred
    _, left = prepare_image(img, 32, "random", u=0.0, v=0.0)
    _, right = prepare_image(img, 32, "random", u=0.999, v=0.0)
    assert left[0] == 0 and right[0] == 21
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_image(img, 30, "center")


@pytest.fixture(scope="module")
def ccd(tiny_sd_path):
    from d4ir_pipeline.stage1.sd import load_img2img_pipeline, unconditional_embeds

    pipe = load_img2img_pipeline(str(tiny_sd_path), device="cpu", attention="sdpa", scheduler="DDIMScheduler")
    return CCD(pipe, steps=4, guidance=3.0, uncond=unconditional_embeds(pipe, K, D))


def _inputs(n, denoise=(2,), seed=0):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    return [
        CCDInput(
            key=f"k{i}",
            image=rng.integers(0, 256, (PX, PX, 3), dtype=np.uint8),
            prompt=torch.randn(K, D, generator=gen),
            denoise=denoise[i % len(denoise)],
            seeds=(sample_seed(0, f"k{i}"), sample_seed(0, f"k{i}", 1)),
        )
        for i in range(n)
    ]


def test_batch_is_seeded_and_independent_of_batch_composition(ccd):
    items = _inputs(4, denoise=(1, 2))  # two step counts: two pipeline calls in one batch
    a, b = ccd(items), ccd(items)
    assert all(o.failure is None and o.attempt == 0 for o in a)
    assert all((x.image == y.image).all() for x, y in zip(a, b, strict=True))
    assert a[0].image.shape == (PX, PX, 3) and a[0].image.dtype == np.uint8
    alone = ccd([items[2]])[0]
    # the same sample alone (batch of 1): same seed, same noise; fp32 CPU kernels agree within one level
    assert np.abs(alone.image.astype(int) - a[2].image.astype(int)).max() <= 1
    other_prompt = ccd([CCDInput(**{**items[2].__dict__, "prompt": torch.zeros(K, D)})])[0]
    assert not (other_prompt.image == a[2].image).all()  # the prompt tokens condition the UNet
    reseeded = ccd([CCDInput(**{**items[2].__dict__, "seeds": (1, 2)})])[0]
    assert not (reseeded.image == a[2].image).all()


def test_nonfinite_latent_is_retried_once_then_dropped(ccd, monkeypatch):
    vae = ccd.pipe.vae
    orig = vae.encode
    calls = []

    def nan_first(x, *args, **kwargs):
        out = orig(x, *args, **kwargs)
        calls.append(x.shape[0])
        if len(calls) == 1:
            out.latent_dist.mean[0] = float("nan")  # sample 0's latent on the first attempt
        return out

    monkeypatch.setattr(vae, "encode", nan_first)
    items = _inputs(3)
    out = ccd(items)
    assert calls == [3, 1]  # the retry runs only the failed sample
    assert out[0].failure is None and out[0].attempt == 1 and out[0].seed == items[0].seeds[1]
    assert [o.attempt for o in out[1:]] == [0, 0]

    def always_nan(x, *args, **kwargs):
        out = orig(x, *args, **kwargs)
        out.latent_dist.mean[:] = float("nan")
        return out

    monkeypatch.setattr(vae, "encode", always_nan)
    out = ccd(_inputs(2))
    assert [o.failure for o in out] == ["nonfinite_latent", "nonfinite_latent"]
    assert all(o.image is None and o.attempt == 1 for o in out)


def test_constant_decode_is_dropped(ccd, monkeypatch):
    vae = ccd.pipe.vae
    monkeypatch.setattr(vae, "decode", lambda z: types.SimpleNamespace(sample=torch.zeros(z.shape[0], 3, PX, PX)))
    out = ccd(_inputs(2))
    assert [o.failure for o in out] == ["constant_image", "constant_image"]
