"""Dark-channel-prior dehazing with guided-filter refinement: the comparison's classical prior row.

K. He, J. Sun, X. Tang, "Single Image Haze Removal Using Dark Channel Prior", CVPR 2009
(TPAMI 33(12), 2011): in a haze-free outdoor patch at least one colour channel is close to
zero, so with the scattering model ``I = J t + A (1 - t)`` the dark channel of ``I / A``
estimates the haze ``1 - t``. The soft-matting refinement of the CVPR paper is replaced,
as the authors themselves later did, by the guided filter of K. He, J. Sun, X. Tang,
"Guided Image Filtering", ECCV 2010 (TPAMI 35(6), 2013). Written here in numpy from the
papers' equations; the method has no learned weights and addresses haze only (rain and
snow rows show "-").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

WEATHERS = ("haze",)  # what the prior addresses; the table shows "-" for the others
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601: the guide image of the guided filter


@dataclass(frozen=True)
class DCPConfig:
    """The method's constants (defaults: the papers' values, radius / eps this project's reading)."""

    patch: int = 15  # side of the local window of the dark channel (the paper: 15 x 15)
    omega: float = 0.95  # keeps a little haze so distant objects still look distant (the paper: 0.95)
    top: float = 0.001  # brightest fraction of the dark channel searched for the airlight (the paper: 0.1 %)
    t0: float = 0.1  # lower bound of the transmission in the recovery (the paper: 0.1)
    radius: int = 60  # guided-filter window radius r ([design]: 4x the patch, as common DCP + GF setups)
    eps: float = 1e-3  # guided-filter regularisation on [0, 1] intensities ([design])


def dark_channel(img: np.ndarray, patch: int) -> np.ndarray:
    """min over the colour channels, then over a ``patch`` x ``patch`` window: (H, W, 3) -> (H, W)."""
    return ndimage.minimum_filter(img.min(axis=2), size=patch, mode="nearest")


def airlight(img: np.ndarray, dark: np.ndarray, top: float) -> np.ndarray:
    """Among the ``top`` brightest dark-channel pixels, the colour of the one brightest in ``img``: (3,)."""
    n = max(1, int(dark.size * top))
    idx = np.argpartition(dark.ravel(), -n)[-n:]  # the n largest dark-channel values
    flat = img.reshape(-1, 3)
    return flat[idx[np.argmax(flat[idx].sum(axis=1))]]


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window clipped to the image, by cumulative sums (He's O(1) box filter)."""
    h, w = x.shape
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = x.cumsum(0).cumsum(1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    total = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
    count = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / count


def guided_filter(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """Edge-preserving smoothing of ``src`` steered by ``guide`` (both (H, W)): ``q = mean(a) I + mean(b)``."""
    mean_i, mean_p = box_mean(guide, r), box_mean(src, r)
    var_i = box_mean(guide * guide, r) - mean_i * mean_i
    cov_ip = box_mean(guide * src, r) - mean_i * mean_p
    a = cov_ip / (var_i + eps)  # the local linear model q = a I + b in each window
    b = mean_p - a * mean_i
    return box_mean(a, r) * guide + box_mean(b, r)


def dehaze(img: np.ndarray, cfg: DCPConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dehaze an (H, W, 3) float image in [0, 1]; returns (J, refined transmission (H, W), airlight (3,))."""
    cfg = cfg or DCPConfig()
    img = np.asarray(img, dtype=np.float64)
    # 1. airlight from the dark channel of the input
    a = airlight(img, dark_channel(img, cfg.patch), cfg.top)
    # 2. coarse transmission from the dark channel of the normalised image, refined by the guided filter
    t_coarse = 1.0 - cfg.omega * dark_channel(img / np.maximum(a, 1e-6), cfg.patch)
    t = guided_filter(img @ LUMA, t_coarse, cfg.radius, cfg.eps)
    # 3. scene radiance J = (I - A) / max(t, t0) + A
    j = (img - a) / np.maximum(t, cfg.t0)[..., None] + a
    return np.clip(j, 0.0, 1.0), t, a


def dehaze_model(cfg: DCPConfig | None = None) -> Any:
    """``dehaze`` as a restoration model: (1, 3, H, W) tensor in [0, 1] -> (1, 3, H, W) (evaluate.score_pairs)."""
    import torch

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x[0].permute(1, 2, 0).double().cpu().numpy()  # (H, W, 3)
        j = dehaze(arr, cfg)[0]
        return torch.from_numpy(j).permute(2, 0, 1)[None].to(x.device, x.dtype)

    return run
