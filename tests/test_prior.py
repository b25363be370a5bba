"""Dark channel prior + guided filter: a synthetic hazy image of known transmission and airlight is recovered."""

from __future__ import annotations

import numpy as np
import torch

from d4ir_pipeline.common.images import psnr
from d4ir_pipeline.paper.prior import DCPConfig, box_mean, dark_channel, dehaze, dehaze_model, guided_filter


def _scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A clean outdoor-like image that obeys the prior: 8 px blocks of saturated colour (one channel near 0)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0.15, 1.0, (h // 8, w // 8, 3))
    dark = rng.integers(0, 3, (h // 8, w // 8))
    blocks[np.arange(h // 8)[:, None], np.arange(w // 8)[None, :], dark] = rng.uniform(0.0, 0.04, (h // 8, w // 8))
    img = np.kron(blocks, np.ones((8, 8, 1)))
    return np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)


def _haze(clean: np.ndarray, airlight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sky band of airlight colour on top, then I = J t + A (1 - t) with depth growing towards the top.

    Returns (clean with its sky, hazy, transmission (H, W)); the sky is where the densest haze
    is, as in outdoor photos, which is where the method looks for the airlight.
    """
    h, w = clean.shape[:2]
    clean = clean.copy()
    sky = h // 6
    clean[:sky] = airlight * 0.97
    depth = np.concatenate([np.full(sky, 4.0), np.linspace(1.6, 0.3, h - sky)])
    t = np.exp(-depth)[:, None] * np.ones((1, w))  # (H, W): 0.02 in the sky, 0.2 .. 0.74 below
    return clean, clean * t[..., None] + airlight * (1.0 - t[..., None]), t


def test_dcp_recovers_a_known_haze() -> None:
    a_true = np.array([0.86, 0.9, 0.94])
    clean, hazy, t_true = _haze(_scene(), a_true)
    out, t, a = dehaze(hazy, DCPConfig(patch=15, radius=30))
    # the airlight comes from the densest haze, the transmission from the dark channel (omega = 0.95 keeps
    # 5 % of the haze and the window minimum overestimates t where depth changes: a bias below 0.1)
    np.testing.assert_allclose(a, a_true, atol=0.02)
    assert np.abs(t - t_true)[t_true > 0.2].mean() < 0.1
    p_in, p_out = psnr(hazy, clean), psnr(out, clean)
    assert p_out > p_in + 7.0, (p_in, p_out)  # measured: 9.6 -> 18.8 dB
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_dark_channel_of_a_haze_free_image_is_near_zero_and_of_haze_is_not() -> None:
    clean = _scene(seed=1)
    _, hazy, _ = _haze(clean, np.array([0.9, 0.9, 0.9]))
    assert dark_channel(clean, 15).mean() < 0.05
    assert dark_channel(hazy, 15).mean() > 0.3


def test_box_mean_and_guided_filter() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((9, 13))
    r = 2
    brute = np.array(
        [[x[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean() for j in range(13)] for i in range(9)]
    )
    np.testing.assert_allclose(box_mean(x, r), brute, rtol=1e-12, atol=1e-12)
    # a constant input is kept; with the input as its own guide and a tiny eps the filter is the identity
    np.testing.assert_allclose(guided_filter(x, np.full_like(x, 0.3), 3, 1e-3), 0.3, atol=1e-12)
    np.testing.assert_allclose(guided_filter(x, x, 3, 1e-8), x, atol=1e-4)
    # a large eps smooths: the output's variance drops below the input's
    assert guided_filter(x, x, 3, 10.0).var() < 0.2 * x.var()


def test_dehaze_model_is_a_restoration_model() -> None:
    _, hazy, _ = _haze(_scene(h=48, w=64), np.array([0.9, 0.9, 0.9]))
    x = torch.from_numpy(hazy).permute(2, 0, 1)[None].float()  # (1, 3, 48, 64)
    y = dehaze_model(DCPConfig(patch=7, radius=16))(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = dehaze(x[0].permute(1, 2, 0).double().numpy(), DCPConfig(patch=7, radius=16))[0]
    np.testing.assert_allclose(y[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
