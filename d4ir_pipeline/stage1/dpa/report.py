"""The DPA report: held-out weather accuracy (k-NN, linear probe), content invariance, PCA plot."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from d4ir_pipeline.common.io import atomic_write_bytes, atomic_write_json
from d4ir_pipeline.data.manifests import ImageRecord, load_manifest, open_rgb
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.stage1.dpa.config import DPAConfig, ReportSection
from d4ir_pipeline.stage1.dpa.data import ImageStore
from d4ir_pipeline.stage1.dpa.model import DPAModel, dpa_embedding, encode_images, prepare_image

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- report


def _embed_images(model: DPAModel, images: list[torch.Tensor], device) -> torch.Tensor:
    """uint8 (3, H, W) images -> DPA embeddings (N, K*D) of their :func:`encode_images` tokens."""
    return dpa_embedding(encode_images(model, images, device))


def _knn_predict(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine k-NN (embeddings are unit norm); votes weighted by similarity."""
    k = min(k, train.shape[0])
    sims, idx = (test @ train.T).topk(k, dim=1)  # (M, k)
    n_cls = int(train_y.max()) + 1
    votes = torch.zeros(test.shape[0], n_cls)
    votes.scatter_add_(1, train_y[idx], sims.clamp(min=0) + 1e-6)
    return votes.argmax(1)


def _train_embeddings(model: DPAModel, store: ImageStore, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embeddings (N, K*D) and weather classes (N,) of the labelled training images, and the sorted weathers."""
    train_recs = [(i, r) for i, r in enumerate(store.records) if r.weather is not None]
    if not train_recs:
        raise D4IRError("the DPA report needs weather labels on the training images (none has one)")
    weathers = sorted({r.weather for _, r in train_recs})
    cls = {w: i for i, w in enumerate(weathers)}
    train_x = _embed_images(model, [store.get(i) for i, _ in train_recs], device)
    train_y = torch.tensor([cls[r.weather] for _, r in train_recs])
    return train_x, train_y, weathers


def _held_out(
    rcfg: ReportSection, load_size: int, train_sources: set[str]
) -> tuple[list[torch.Tensor], list[ImageRecord], Counter, int]:
    """The degraded test images whose source photo was not in training: images, records, skipped reasons, overlap."""
    test_imgs, test_recs, skipped, overlap = [], [], Counter(), 0
    for path in rcfg.test_manifests:
        if not Path(path).is_file():
            raise D4IRError(f"`report.test_manifests`: {path!r} does not exist (or set report.enabled = false)")
        for rec in load_manifest(path):
            if rec.weather is None or rec.weather == "clean":
                continue
            if rec.source is not None and rec.source in train_sources:
                overlap += 1
                continue
            try:
                test_imgs.append(prepare_image(open_rgb(rcfg.test_root, rec), load_size))
            except BadImageError as e:
                skipped[e.reason] += 1
                continue
            test_recs.append(rec)
    if not test_recs:
        raise D4IRError(f"no held-out test images in {list(rcfg.test_manifests)} (overlap with training: {overlap})")
    if overlap:
        logger.info("report: left out %d test image(s) whose source photo was in training", overlap)
    return test_imgs, test_recs, skipped, overlap


def _weather_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    weathers: list[str],
    test_x: torch.Tensor,
    test_recs: list[ImageRecord],
    knn_k: int,
) -> dict:
    """The report's accuracy keys: cosine k-NN (overall and per weather) and a linear probe (two weathers or more)."""
    from sklearn.linear_model import LogisticRegression

    cls = {w: i for i, w in enumerate(weathers)}
    unknown = sorted({r.weather for r in test_recs} - set(cls))
    if unknown:
        logger.warning("test weathers %s were not in training: counted as errors", unknown)
    test_y = torch.tensor([cls.get(r.weather, -1) for r in test_recs])
    knn = _knn_predict(train_x, train_y, test_x, knn_k)
    acc_lin = None
    if len(weathers) >= 2:
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(train_x.numpy(), train_y.numpy())
        acc_lin = float((torch.from_numpy(probe.predict(test_x.numpy())) == test_y).float().mean())
    return {
        "held_out_weather_accuracy": float((knn == test_y).float().mean()),
        "classifier": f"cosine {min(knn_k, len(train_x))}-NN on train embeddings",
        "linear_probe_accuracy": acc_lin,
        "per_weather_accuracy": {
            w: float((knn[test_y == i] == i).float().mean()) for w, i in cls.items() if bool((test_y == i).any())
        },
    }


def _content_invariance(test_x: torch.Tensor, test_recs: list[ImageRecord]) -> dict:
    """The report's invariance keys: mean cosine, same weather / other photo vs other weather / same photo.

    "photo" = the clean target (same crop under every weather), else the source.
    """
    photo = [r.target_sha256 or r.source or r.id for r in test_recs]
    pid = {p: i for i, p in enumerate(sorted(set(photo)))}
    p = torch.tensor([pid[x] for x in photo])
    wid = {x: i for i, x in enumerate(sorted({r.weather for r in test_recs}))}
    w = torch.tensor([wid[r.weather] for r in test_recs])
    sim = test_x @ test_x.T
    off = ~torch.eye(len(test_recs), dtype=torch.bool)
    same_w_diff_p = (w[:, None] == w[None, :]) & (p[:, None] != p[None, :]) & off
    diff_w_same_p = (w[:, None] != w[None, :]) & (p[:, None] == p[None, :]) & off
    sw = float(sim[same_w_diff_p].mean()) if bool(same_w_diff_p.any()) else None
    dw = float(sim[diff_w_same_p].mean()) if bool(diff_w_same_p.any()) else None
    return {
        "same_weather_diff_photo_cos": sw,
        "diff_weather_same_photo_cos": dw,
        "content_invariance_margin": (sw - dw) if sw is not None and dw is not None else None,
        "pairs": {
            "same_weather_diff_photo": int(same_w_diff_p.sum()) // 2,
            "diff_weather_same_photo": int(diff_w_same_p.sum()) // 2,
        },
    }


def dpa_report(model: DPAModel, cfg: DPAConfig, store: ImageStore, device) -> dict:
    """Held-out weather accuracy (k-NN + linear probe) and content invariance on the test sets."""
    # 1. the labelled training images, and the held-out test images (source photo not in training)
    model.eval()
    train_x, train_y, weathers = _train_embeddings(model, store, device)
    train_sources = {r.source for r in store.records if r.source is not None}
    test_imgs, test_recs, skipped, overlap = _held_out(cfg.report, cfg.data.load_size, train_sources)
    test_x = _embed_images(model, test_imgs, device)

    # 2. the numbers
    report = {
        **_weather_accuracy(train_x, train_y, weathers, test_x, test_recs, cfg.report.knn_k),
        **_content_invariance(test_x, test_recs),
        "n_train": len(train_x),
        "n_test": len(test_recs),
        "test_left_out_source_overlap": overlap,
        "test_skipped": dict(skipped),
        "weathers": weathers,
    }

    # 3. the plot
    if cfg.report.plot:
        _plot_pca(train_x, [weathers[i] for i in train_y], test_x, [r.weather for r in test_recs],
                  Path(cfg.output.dir) / "embeddings.png")  # fmt: skip
        report["plot"] = "embeddings.png"
    return report


def maybe_report(cfg: DPAConfig, model: DPAModel, store: ImageStore, device) -> dict | None:
    if not cfg.report.enabled:
        return None
    report = dpa_report(model, cfg, store, device)
    atomic_write_json(Path(cfg.output.dir) / "report.json", report)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    logger.info(
        "DPA report: held-out weather accuracy %s (k-NN; linear probe %s; n=%d), content invariance: "
        "same-weather/different-photo cos %s vs different-weather/same-photo cos %s",
        fmt(report["held_out_weather_accuracy"]), fmt(report["linear_probe_accuracy"]), report["n_test"],
        fmt(report["same_weather_diff_photo_cos"]), fmt(report["diff_weather_same_photo_cos"]),
    )  # fmt: skip
    return report


def _plot_pca(train_x: torch.Tensor, train_w: list[str], test_x: torch.Tensor, test_w: list[str], path: Path) -> None:
    """2-D PCA (fit on train) of the embeddings: dots train, crosses held-out test; colour = weather."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean = train_x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(train_x - mean, full_matrices=False)
    proj = lambda x: ((x - mean) @ v[:2].T).numpy()  # noqa: E731
    a, b = proj(train_x), proj(test_x)
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"rain": "tab:blue", "haze": "tab:gray", "snow": "tab:orange"}
    for wname in sorted(set(train_w) | set(test_w)):
        c = colours.get(wname, None)
        m = [i for i, x in enumerate(train_w) if x == wname]
        ax.scatter(a[m, 0], a[m, 1], s=8, c=c, alpha=0.5, label=f"{wname} (train)")
        m = [i for i, x in enumerate(test_w) if x == wname]
        ax.scatter(b[m, 0], b[m, 1], s=20, c=c, marker="x", label=f"{wname} (held-out)")
    ax.set_title("DPA embeddings (PCA)")
    ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
