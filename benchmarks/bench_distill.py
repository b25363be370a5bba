"""Stage-two benchmarks (CPU): streaming vs in-memory throughput, peak RSS vs data size, label cache.

1. Student training samples/s streaming from shards (DataLoader workers decoding PNGs)
   vs the same ``distill()`` loop fed the same samples pre-decoded in memory as
   tensors (goal: >= 0.9x).
2. Peak RSS of a full pass over 1x and 10x as many shards, each in a fresh subprocess
   (goal: 10x / 1x <= 1.1: streaming memory does not grow with the data).
3. The teacher-target cache: a second student's run with cached teacher outputs vs
   the same run computing the (much heavier) teacher every step (goal: >= 2x faster).

Usage: python benchmarks/bench_distill.py [--quick | --smoke]   (smoke: tiny sizes, checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


LOCAL_CNN = "d4ir_pipeline.models.students:LocalCNN"

# per size: throughput (steps, reps, samples per shard, steps skipped before timing),
# peak RSS (samples per shard, shards at 1x, image px), label cache (steps, samples per shard)
SIZES = {
    "full": {"tp": (40, 4, 48, 5), "rss": (32, 4, 512), "lc": (40, 16)},
    "quick": {"tp": (20, 2, 24, 5), "rss": (8, 4, 512), "lc": (12, 8)},
    "smoke": {"tp": (6, 1, 8, 2), "rss": (4, 4, 128), "lc": (4, 4)},
}


def make_shardset(root: Path, n_shards: int, per: int, size: int, seed: int = 0, compress: int = 6) -> Path:
    """A shard set in stage one's format: smooth random images with incompressible detail (PNG)."""
    from d4ir_pipeline.testing import make_shardset as build

    return build(root, n_shards, per, size, seed=seed, smooth=8, noise=8.0, compress_level=compress, clean=False)


def save_random(spec: str, path: Path, seed: int = 0, **kw) -> Path:
    import torch

    from d4ir_pipeline.models import build_model, save_model

    torch.manual_seed(seed)
    save_model(build_model(spec, **kw), path)
    return path


def config(tmp: Path, shards: Path, teacher: Path, student: str, skw: str, tag: str, **extra) -> object:
    from d4ir_pipeline.config import load_config
    from d4ir_pipeline.stage2.distill import DistillConfig

    over = {
        "output.dir": f"'{tmp / 'distill'}'",
        "data.shards": f"'{shards}'",
        "teacher.checkpoint": f"'{teacher}'",
        "student.name": f"'{student}'",
        "student.kwargs": skw,
        "student.tag": f"'{tag}'",
        "data.holdout_fraction": "0.0",
        "val.samples": "0",
        "log.every": "1",
        "log.progress": "false",
        "train.ckpt_every": "100000",
        "runtime.device": "'cpu'",
    }
    over.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return load_config(DistillConfig, None, [f"{k}={v}" for k, v in over.items()])


def steady_rate(run_dir: Path, skip: int, batch: int) -> tuple[float, float]:
    """(samples/s from the median step time, fraction of the time spent waiting for data) after ``skip`` steps.

    The median ignores the stalls other processes on a shared machine cause now and then.
    """
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "elapsed_s" in r][skip - 1 :]
    t = np.array([r["elapsed_s"] for r in recs])
    wait = (recs[-1]["data_wait_s"] - recs[0]["data_wait_s"]) / (t[-1] - t[0])
    return batch / float(np.median(np.diff(t))), float(wait)


def in_memory_source(shards: Path, batch: int, patch: int, seed: int):
    """A batch source over the same samples pre-decoded into uint8 tensors (same crops and flips logic)."""
    import torch

    from d4ir_pipeline.common.images import decode_rgb
    from d4ir_pipeline.shardset.reader import iter_tar, open_shardset

    arrays = []
    for s in open_shardset(shards).shards:
        for _key, parts in iter_tar(s.path):
            arrays.append(torch.from_numpy(np.array(decode_rgb(parts["degraded.png"])[0])).permute(2, 0, 1))
    data = torch.stack(arrays)  # (N, 3, H, W) uint8, all in memory
    if data.shape[0] < batch:  # the loop below would never yield a batch
        raise ValueError(f"{shards}: {data.shape[0]} samples, fewer than one batch of {batch}")

    def source(ctx):
        rng = np.random.default_rng(seed)
        n, _, h, w = data.shape
        i = 0
        while True:
            idx = rng.permutation(n)
            for start in range(0, n - batch + 1, batch):
                crops = []
                for j in idx[start : start + batch]:
                    top, left = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
                    c = data[j, :, top : top + patch, left : left + patch]
                    if rng.integers(0, 2):
                        c = c.flip(-1)
                    if rng.integers(0, 2):
                        c = c.flip(-2)
                    crops.append(c)
                i += 1
                yield {
                    "x": torch.stack(crops).contiguous(),
                    "t": None,
                    "keys": [],
                    "cursor": (0, 0, i * batch),
                    "stats": (0, i * batch, 0),
                }

    return source, int(data.shape[0])


def bench_throughput(tmp: Path, size_name: str) -> dict:
    from d4ir_pipeline.stage2.distill import distill

    size, patch, batch = 128, 64, 8
    steps, reps, per, skip = SIZES[size_name]["tp"]
    shards = make_shardset(tmp / "tp-shards", n_shards=8, per=per, size=size)
    # CPU-sized models (the demo's NAFNets take seconds per step on 2 shared cores)
    teacher = save_random(LOCAL_CNN, tmp / "tp-teacher", width=16, layers=4)
    skw = "{width = 16, blocks = 2}"
    common = dict(
        data__patch=patch, data__batch_size=batch, train__steps=steps, data__shuffle_buffer=64, data__shuffle_initial=16
    )
    source, n = in_memory_source(shards, batch, patch, seed=0)
    rates: dict[str, list[float]] = {"memory": [], "streaming": []}
    waits: list[float] = []
    for rep in range(reps):  # interleaved, order alternating, so changes in machine load hit both alike
        for mode in ("memory", "streaming") if rep % 2 == 0 else ("streaming", "memory"):
            if mode == "memory":
                r = distill(config(tmp, shards, teacher, "rescnn", skw, f"mem-{rep}", **common), batch_source=source)
            else:
                r = distill(config(tmp, shards, teacher, "rescnn", skw, f"stream-{rep}", data__num_workers=1, **common))
            rate, wait = steady_rate(r.out_dir, skip, batch)
            rates[mode].append(rate)
            if mode == "streaming":
                waits.append(wait)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    return {
        "samples_in_memory": n,
        "steps": steps,
        "batch": batch,
        "patch": patch,
        "image_px": size,
        "in_memory_samples_per_s": [round(r, 2) for r in rates["memory"]],
        "streaming_samples_per_s": [round(r, 2) for r in rates["streaming"]],
        "ratio_streaming_over_memory_median": round(med["streaming"] / med["memory"], 3),
        "ratio_streaming_over_memory_best": round(max(rates["streaming"]) / max(rates["memory"]), 3),
        "streaming_data_wait_fraction": [round(w, 4) for w in waits],
        "goal": ">= 0.9",
    }


def _tree_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over ``pid`` and all its descendants (Linux /proc; PSS splits shared pages)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    rss = pss = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            continue  # a process that just ended
    return rss, pss


def _rss_child(mode: str, shards: str, steps: int, out: str) -> None:
    """Child process: one pass over the shard set (streamed, or pre-loaded into memory), then its peak memory.

    A thread samples the RSS and PSS of this process plus its DataLoader workers every 50 ms.
    """
    import threading

    from d4ir_pipeline.stage2.distill import distill

    peak = {"rss_mib": 0.0, "pss_mib": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss = _tree_memory_mib(os.getpid())
            peak["rss_mib"], peak["pss_mib"] = max(peak["rss_mib"], rss), max(peak["pss_mib"], pss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tmp = Path(out)
    teacher = save_random(LOCAL_CNN, tmp / "rss-teacher", width=8, layers=2)
    cfg = config(
        tmp,
        Path(shards),
        teacher,
        "rescnn",
        "{width = 8, blocks = 1}",
        f"{Path(shards).name}-{mode}",
        data__patch=32,
        data__batch_size=16,
        data__num_workers=1,
        train__steps=steps,
        data__shuffle_buffer=32,
        data__shuffle_initial=8,
    )
    source = in_memory_source(Path(shards), 16, 32, seed=0)[0] if mode == "memory" else None
    distill(cfg, batch_source=source)
    stop.set()
    sampler.join()
    # Linux: ru_maxrss in KiB (the training process alone)
    peak["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(peak))


def bench_rss(tmp: Path, size_name: str) -> dict:
    """Peak RSS / PSS of the process tree for a full pass over 1x and 10x the shards (512 px PNGs), fresh processes.

    The same pass with every sample pre-loaded in memory is the contrast that shows what
    the measurement would see if memory grew with the data.
    """
    per, n1, px = SIZES[size_name]["rss"]
    res: dict = {}
    for mult in (1, 10):
        shards = make_shardset(tmp / f"rss-{mult}x", n_shards=n1 * mult, per=per, size=px, seed=mult, compress=1)
        steps = max(1, n1 * mult * per // 16)  # one full pass over the data
        for mode in ("stream", "memory"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", mode, str(shards), str(steps), str(tmp / f"rss-{mult}")],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res.setdefault(mode, {})[f"{mult}x"] = {
                **{k: round(v, 1) for k, v in r.items()},
                "samples": n1 * mult * per,
                "steps": steps,
                "shard_mib": round(sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20, 1),
            }
        shutil.rmtree(shards)
    for mode in ("stream", "memory"):
        for k in ("rss_mib", "pss_mib"):
            res[mode][f"ratio_10x_over_1x_{k[:3]}"] = round(res[mode]["10x"][k] / res[mode]["1x"][k], 3)
    res["goal"] = "stream ratio <= 1.1 (process tree: training process + DataLoader workers)"
    return res


def bench_label_cache(tmp: Path, size_name: str) -> dict:
    from d4ir_pipeline.stage2.distill import distill
    from d4ir_pipeline.stage2.labels import label

    size, patch, batch = 96, 48, 8
    steps, per = SIZES[size_name]["lc"]
    shards = make_shardset(tmp / "lc-shards", n_shards=4, per=per, size=size, seed=3)
    # a teacher much heavier than the student: NAFNet width 32 vs a 1-block width-8 ResCNN
    teacher = save_random(
        "nafnet", tmp / "lc-teacher", width=32, enc_blk_nums=[1, 1, 1, 2], middle_blk_num=2, dec_blk_nums=[1, 1, 1, 1]
    )
    common = dict(
        data__patch=patch,
        data__batch_size=batch,
        train__steps=steps,
        data__num_workers=1,
        data__shuffle_buffer=16,
        data__shuffle_initial=8,
    )
    skw = "{width = 8, blocks = 1}"
    t0 = time.perf_counter()
    no_cache = distill(config(tmp, shards, teacher, "rescnn", skw, "lc-teacher", labels__use="'off'", **common))
    t_no_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    lab = label(config(tmp, shards, teacher, "rescnn", skw, "x", **common))
    t_label = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = distill(config(tmp, shards, teacher, "rescnn", skw, "lc-cached", labels__use="'require'", **common))
    t_cached = time.perf_counter() - t0
    r_no = steady_rate(no_cache.out_dir, 2, batch)[0]
    r_ca = steady_rate(cached.out_dir, 2, batch)[0]
    return {
        "steps": steps,
        "labelled_samples": lab.samples,
        "label_seconds": round(t_label, 2),
        "run_seconds_teacher_each_step": round(t_no_cache, 2),
        "run_seconds_with_cache": round(t_cached, 2),
        "speedup_wall": round(t_no_cache / t_cached, 2),
        "samples_per_s_teacher_each_step": round(r_no, 2),
        "samples_per_s_with_cache": round(r_ca, 2),
        "speedup_steady": round(r_ca / r_no, 2),
        "targets": cached.targets,
        "goal": ">= 2x",
    }


def run(size: str = "full", parts: tuple[str, ...] = ("throughput", "peak_rss", "label_cache")) -> dict:
    """The stage-two benchmarks (all three by default) at ``size`` (full / quick / smoke); returns their numbers.

    Training threads: the same in every run, one core fewer than the machine has
    (``D4IR_BENCH_THREADS`` overrides), so the DataLoader worker decodes on its own core as
    it does on a GPU machine, where the GPU trains and the CPU decodes. Without that, on a
    2-core box the streaming run would be measuring the decoding's share of the two cores.
    """
    import torch

    from d4ir_pipeline.common.runtime import usable_cpus

    torch.set_num_threads(int(os.environ.get("D4IR_BENCH_THREADS") or max(1, usable_cpus() - 1)))
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as d:
        tmp = Path(d)
        out = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
        benches = {"throughput": bench_throughput, "peak_rss": bench_rss, "label_cache": bench_label_cache}
        for name in parts:
            fn = benches[name]
            t0 = time.perf_counter()
            out[name] = fn(tmp, size)
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    from _sizes import add_size_flags  # benchmarks/ is on sys.path (the script's folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(ap)
    ap.add_argument("--only", nargs="+", choices=["throughput", "peak_rss", "label_cache"], help="run only these")
    ap.add_argument("--rss-child", nargs=4, metavar=("MODE", "SHARDS", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]), args.rss_child[3])
    else:
        print(json.dumps(run(args.size, tuple(args.only or ("throughput", "peak_rss", "label_cache"))), indent=2))
