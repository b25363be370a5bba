"""The shared training plumbing: the LR schedule is bit-exact for every committed config, checkpoint
folders survive torn writes and prune, RNG state round-trips, the metrics log trims and mirrors to TensorBoard."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from d4ir_pipeline.common.seeds import splitmix_seed, text_seed, tuple_seed
from d4ir_pipeline.common.train import CheckpointDir, MetricsLog, rng_state, set_rng_state, warmup_cosine
from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.demo.demo_sd import UNetTrain, VAETrain, phase_warmup
from d4ir_pipeline.demo.reference_teacher import ReferenceTeacherConfig
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.paper.compare import CompareConfig
from d4ir_pipeline.stage1.dpa.config import DPAConfig
from d4ir_pipeline.stage2.config import DistillConfig

# ---------------------------------------------------------------------------------------
# 1. the schedule: every committed config, bit for bit

# sha256 of " ".join(float.hex(lr) for every step) computed ONCE with the five former formulas
# (dpa._lr_at, distill's lr_factor under LambdaLR, reference_teacher._lr_lambda under LambdaLR,
# demo_sd._lr_at, DFMC's inline LambdaLR lambda) at the commit before they were merged.
# compare/demo/quick/* were re-pinned when the quick budget became 150 steps (54da803): a budget change,
# computed by the same code path whose other entries still match the former formulas.
# (number of values, sha256)
PINNED = {
    "dpa/demo": (200, "80fea03d6f4e1c54762c3beab896a4c3216f5b6de80d61cad206affa715559a3"),
    "dpa/smoke": (12, "f19a5ae35afc03c43899e90f1ba9d779701ff382b7ba8f8f96986ec774dc1302"),
    "dpa/sd15": (5000, "69c2fe1c74c8fd7c1092226d1c4fcc992b373bbb04091be41a6acff61fe2ab38"),
    "distill/demo": (1201, "e86e0c6c8bcb872c8f3d1afb5400d8aab2414613e91cb47e2acb9aee9f8724ae"),
    "distill/smoke": (7, "cc1196527d6bfc2d5d2c262ec374c7d4af1f12063f0aee9cb376ff2fcad3f651"),
    "distill/sd15": (100001, "bbb32f52741370dc6492fd5df00d2b81778029931902c28f408ac47f4064c9cb"),
    "compare/demo/budget/distill": (2001, "deaf2c6de80ff383f0d686eea9ce235d871d1fe6c12eb40ce50ec67a7bb57d5c"),
    "compare/demo/budget/dfmc": (2001, "1c71382afb4a9770c547f36a9c85b7029bbca751f52861051a6364b06ab0e0b8"),
    "compare/demo/quick/distill": (151, "a90e6629923e680d1e27dab4956fe0d690f8d8a10ef943da8f870017c1e46561"),
    "compare/demo/quick/dfmc": (151, "f2edf629495df72a3a59b6fe71d71ce6b686a2eaa1ac8e31ec9d782c8dd5aae8"),
    "compare/smoke/budget/distill": (9, "7ba0d2deeab4e78bc6d12941a90d298739fd03e0845b5318b68121ec1c180120"),
    "compare/smoke/budget/dfmc": (9, "8d2d461d8766c088f21f6d834991359ad7e1228f897eefe9b8031f9bc2e65cab"),
    "compare/smoke/quick/distill": (5, "572ef88c6598a65ebd7e4235ac3d342605fd0b4f9aad37ec767e416877a10c39"),
    "compare/smoke/quick/dfmc": (5, "472ae4031ef1716c04c94bbcb694521ebb0210562b2175ce09d6ef5600bb0b32"),
    "compare/sd15/budget/distill": (20001, "e1e47f646368a63b8b8cdc53af3518ae6e559eab1849b42ccf60e380a33abd54"),
    "compare/sd15/budget/dfmc": (20001, "03924a41b02cbf672d0060edc3959caa587ad4a90488818ae2ef24d7eaef6e68"),
    "compare/sd15/quick/distill": (2001, "44a37f0214319ce1a253a81665a23f58d57dffb47d5683133876d85eca519b69"),
    "compare/sd15/quick/dfmc": (2001, "9fdbc7746c89f31f29b4f379f3082fa41c0f534abb2595cb1342d1cc731ea78b"),
    "teacher/demo": (1201, "1db2667a4cbfcfb362f8819dc6459b73c9298e1763aa262ed45e23ae38fd552c"),
    "teacher/smoke": (7, "c75918bfae5932c355550e9b5cc638c663125d06c8f9468967c40c4433bf5f46"),
    "demo_sd/vae": (700, "079019413080277f12e8150f9841605c3134035a4c5382f7bfd392dfcddbf545"),
    "demo_sd/unet": (1200, "feae40000ce280019493e84f1a6204b0fdf03246e0eef7e3e95d8f4f3fe7c4da"),
}


def _lambda_lr(base_lr: float, n: int, **schedule) -> list[float]:
    """What torch's LambdaLR sets at epochs 0..n-1 with a warmup_cosine factor: ``base_lr * factor(epoch)``."""
    return [base_lr * warmup_cosine(s, **schedule) for s in range(n)]


def _by_hand(n: int, **schedule) -> list[float]:
    """What the loops that set the rate themselves use: ``warmup_cosine(step, peak=lr)``."""
    return [warmup_cosine(s, **schedule) for s in range(n)]


def _schedules() -> dict[str, list[float]]:
    """The learning rate of every step of every committed config, as each loop now computes it."""
    out: dict[str, list[float]] = {}
    for p in ("demo", "smoke", "sd15"):
        t = load_stage_config(DPAConfig, "dpa", profile=p, work_dir="/w").train
        out[f"dpa/{p}"] = _by_hand(t.steps, total=t.steps, warmup=t.warmup_steps, min_ratio=0.1, peak=t.lr)
        d = load_stage_config(DistillConfig, "distill", profile=p, work_dir="/w").train
        out[f"distill/{p}"] = _lambda_lr(
            d.lr, d.steps + 1, total=d.steps, warmup=d.warmup_steps, min_ratio=d.min_lr_ratio
        )
        c = load_stage_config(CompareConfig, "compare", profile=p, work_dir="/w")
        for name in ("budget", "quick"):
            b = getattr(c, name)
            warmup = min(b.warmup, b.steps // 10)  # compare's distill rows
            out[f"compare/{p}/{name}/distill"] = _lambda_lr(
                d.lr, b.steps + 1, total=b.steps, warmup=warmup, min_ratio=d.min_lr_ratio
            )
            # DFMC: student_steps = 1, no warm-up, cosine to 0
            out[f"compare/{p}/{name}/dfmc"] = _lambda_lr(
                c.dfmc.s_lr or d.lr, b.steps + 1, total=b.steps, angle_first=True
            )
    for p in ("demo", "smoke"):
        t = load_stage_config(ReferenceTeacherConfig, "teacher", profile=p, work_dir="/w").train
        floor = t.min_lr / t.lr if t.lr > 0 else 0.0
        out[f"teacher/{p}"] = _lambda_lr(t.lr, t.steps + 1, total=t.steps, warmup=t.warmup_steps, min_ratio=floor)
    for name, ph in (("vae", VAETrain()), ("unet", UNetTrain())):
        out[f"demo_sd/{name}"] = _by_hand(
            ph.steps, total=ph.steps, warmup=phase_warmup(ph.steps), min_ratio=0.1, peak=ph.lr
        )
    return out


def test_schedule_is_bit_exact_for_every_committed_config():
    got = _schedules()
    assert set(got) == set(PINNED)
    for name, vals in got.items():
        digest = hashlib.sha256(" ".join(float(v).hex() for v in vals).encode()).hexdigest()
        assert (len(vals), digest) == PINNED[name], name


def test_schedule_shape():
    lrs = [warmup_cosine(s, total=10, warmup=2, min_ratio=0.1, peak=2.0) for s in range(12)]
    assert lrs[0] == 1.0 and lrs[1] == 2.0  # linear warm-up reaches the peak at the last warm-up step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # then never rises
    assert lrs[10] == lrs[11] == pytest.approx(0.2)  # the floor from `total` on
    # the order of operations matters for bit-exactness: peak * (s + 1) / warmup, not peak * ((s + 1) / warmup)
    assert warmup_cosine(2, total=100, warmup=10, peak=1e-4) == 1e-4 * 3 / 10
    assert warmup_cosine(0, total=5) == 1.0 and warmup_cosine(5, total=5) == 0.0
    # DFMC's angle order (pi * t / span) differs in the last bit from pi * (t / span) on some steps
    assert any(warmup_cosine(s, total=2000, angle_first=True) != warmup_cosine(s, total=2000) for s in range(2000))


# ---------------------------------------------------------------------------------------
# 2. checkpoint folders


def _save(ck: CheckpointDir, step: int) -> Path:
    return ck.save(
        step,
        state={"optimizer": {"lr": 0.1 * step}, "rng": rng_state()},
        weights={"model": {"w": torch.full((2, 3), float(step))}},
        write=lambda d: (d / "meta.json").write_text(json.dumps({"step": step})),
    )


def test_checkpoint_write_load_and_prune(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt", keep=2)
    assert ck.latest() is None and ck.load() is None
    for step in (3, 6, 9):
        _save(ck, step)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-00000006", "step-00000009"]
    last = ck.load()
    assert last.step == 9 and last.path.name == "step-00000009"
    assert last.state["optimizer"] == {"lr": 0.1 * 9} and json.loads((last.path / "meta.json").read_text())["step"] == 9
    assert torch.equal(last.weights("model")["w"], torch.full((2, 3), 9.0))
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text()) == {"dir": "step-00000009", "step": 9}


def test_checkpoint_torn_write_keeps_the_previous_one(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt", keep=3)
    _save(ck, 2)

    def crash(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # killed while writing step 4

    with pytest.raises(KeyboardInterrupt):
        ck.save(4, state={}, weights={"model": {"w": torch.zeros(1)}}, write=crash)
    assert ck.load().step == 2  # the pointer still names the complete folder
    assert not (tmp_path / "ckpt" / "step-00000004").exists()
    _save(ck, 4)  # the leftover tmp folder is replaced
    assert ck.load().step == 4 and not list((tmp_path / "ckpt").glob(".*.tmp"))


def test_checkpoint_resume_prunes_folders_of_a_cut_run(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt", keep=1)
    for step in (2, 4, 6):
        _save(ck, step)
    # a run killed after renaming step 8 but before moving the pointer, then resumed from 6
    (tmp_path / "ckpt" / "step-00000008").mkdir()
    _save(ck, 7)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-00000007"]


def test_checkpoint_pointer_to_a_missing_folder_is_a_clear_error(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt")
    path = _save(ck, 5)
    import shutil

    shutil.rmtree(path)
    with pytest.raises(D4IRError, match=r"latest.json names .*step-00000005.*missing.*delete .*ckpt to start over"):
        ck.load()


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt")
    path = _save(ck, 1)
    state = torch.load(path / "state.pt", weights_only=True)  # plain data: no pickled code
    assert state["step"] == 1 and set(state["rng"]) >= {"torch", "numpy", "python"}


# ---------------------------------------------------------------------------------------
# 3. RNG state


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    ck = CheckpointDir(tmp_path / "ckpt")
    ck.save(1, state={"rng": rng_state()})
    want = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(ck.load().state["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# ---------------------------------------------------------------------------------------
# 4. metrics log


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_trims_to_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, resume_step=0) as log:
        for s in range(1, 6):
            log.write({"step": s, "loss": 1.0 / s})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn last line of a killed run
    with MetricsLog(path, resume_step=3, drop=lambda r: "eval" in r) as log:
        log.write({"step": 4, "loss": 0.5})
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]
    with MetricsLog(path, resume_step=0) as log:  # a fresh start empties it
        pass
    assert path.read_text() == ""


def test_metrics_log_shared_file_trims_only_its_own_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as a:
        for s in (1, 2, 3):
            a.write({"phase": "vae", "step": s})
    with MetricsLog(path, resume_step=1, owns=lambda r: r.get("phase") == "unet") as b:
        b.write({"phase": "unet", "step": 1})
    with MetricsLog(path, resume_step=0, owns=lambda r: r.get("phase") == "unet") as b:
        b.write({"phase": "unet", "step": 1})
    assert [(r["phase"], r["step"]) for r in _rows(path)] == [("vae", 1), ("vae", 2), ("vae", 3), ("unet", 1)]


def test_metrics_log_disabled_writes_nothing(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl", resume_step=0, enabled=False, tensorboard=tmp_path / "tb") as log:
        log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "tb").exists()


def test_metrics_log_writes_tensorboard_scalars_when_asked(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLog(tmp_path / "metrics.jsonl", resume_step=0, tensorboard=tmp_path / "tb") as log:
        for s in (1, 2):
            log.write(
                {"step": s, "loss": 1.0 / s, "epoch": 0, "note": "text", "ok": True, "eval": {"rain": {"psnr": 30.0}}}
            )
    assert not list(tmp_path.glob("*.tfevents*"))  # the event files go to the folder asked for
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert tags == {"loss", "epoch", "eval/rain/psnr"}
    assert [(e.step, e.value) for e in ev.Scalars("loss")] == [(1, 1.0), (2, 0.5)]


# ---------------------------------------------------------------------------------------
# 5. seeds: the three formulas, pinned (each stage's outputs depend on its own)


def test_seed_formulas_are_pinned():
    """Values computed once with ccd.sample_seed, stream._mix and dpa._mix_seed before they moved here."""
    from d4ir_pipeline.stage1.ccd import sample_seed

    assert text_seed(0, "abc") == sample_seed(0, "abc") == 6717792680097606246
    assert text_seed(3, "rain/k-001", "retry1") == sample_seed(3, "rain/k-001", attempt=1) == 7173255950330613506
    assert tuple_seed(0, 1) == 12807564646923815589
    assert tuple_seed(5, 2, 1, 0, 1) == 7812101793711136546
    assert splitmix_seed(0, 1, 0) == 7602440250301558358
    assert splitmix_seed(7, 2, 11, 1) == 6059961650689724495
