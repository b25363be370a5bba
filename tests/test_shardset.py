"""The shard-set writer and the tar reader on their own: commit, resume, refusal, merge, label caches, damage."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from d4ir_pipeline.common.io import atomic_write_json, sha256_file
from d4ir_pipeline.shardset.format import LABELS_KIND, RANK_KIND, SHARDSET_KIND, ShardSetError, read_listing
from d4ir_pipeline.shardset.reader import ShardReadError, iter_tar, read_shard, split_key, verify_shardset
from d4ir_pipeline.shardset.writer import ShardSetWriter, merge_shardset

REPO = Path(__file__).resolve().parent.parent
LABEL_IDENTITY = ("teacher.id", "shardset_sha256", "format")


def samples(index: int, n: int = 3, size: int = 800) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """``n`` samples of shard ``index``: seeded bytes standing in for images (the writer never decodes them)."""
    rng = np.random.default_rng(index)
    return [
        (
            f"s{index:02d}-{j}",
            [
                ("json", json.dumps({"key": f"s{index:02d}-{j}"}).encode()),
                ("degraded.png", rng.integers(0, 256, size, dtype=np.uint8).tobytes()),
            ],
        )
        for j in range(n)
    ]


def header(chash: str = "h1", seed: int = 0) -> dict:
    return {"config": {"seed": seed}, "config_hash": chash, "inputs": {}, "models": {}, "versions": {}}


def writer(out: Path, *, num: int = 3, rank: int = 0, world: int = 1, **kw) -> ShardSetWriter:
    return ShardSetWriter(
        out=out, kind=SHARDSET_KIND, header=kw.pop("head", header()), num_shards=num, rank=rank, world_size=world, **kw
    )


def fill(w: ShardSetWriter, todo: list[int]) -> None:
    for i in todo:
        for key, files in samples(i):
            w.write(key, files)
        w.flush_shard(i, skipped={}, dropped={})


def label_header(teacher: str = "t1", skipped: int = 0) -> dict:
    return {
        "teacher": {"id": teacher, "checkpoint": "/somewhere"},
        "shardset": "/shards",
        "shardset_sha256": "ab" * 32,
        "format": "npy",
        "skipped": skipped,
        "versions": {},
    }


LABEL_NAMES = ["synth-r000-000000.tar", "synth-r001-000001.tar"]


def label_writer(out: Path, **kw) -> ShardSetWriter:
    return ShardSetWriter(
        out=out,
        kind=LABELS_KIND,
        header=kw.pop("head", label_header()),
        num_shards=len(LABEL_NAMES),
        names=LABEL_NAMES,
        identity=LABEL_IDENTITY,
        carry=("skipped",),
        **kw,
    )


# ---------------------------------------------------------------------------------------
# writer


def test_write_then_reopen_resumes_and_redoes_a_damaged_shard(tmp_path: Path) -> None:
    out = tmp_path / "set"
    w = writer(out)
    todo = w.open()
    assert todo == [0, 1, 2]
    fill(w, todo)
    doc = w.finish()
    assert doc["kind"] == "d4ir-shardset" and doc["complete"] is True and doc["num_samples"] == 9
    assert [s["name"] for s in doc["shards"]] == [f"synth-r000-00000{i}.tar" for i in range(3)]
    rank_doc, _ = read_listing(out / "shardset.r000.json", RANK_KIND)
    assert rank_doc["done"] is True and rank_doc["owned"] == 3 and rank_doc["config_hash"] == "h1"
    assert [(s["index"], s["rank"]) for s in rank_doc["shards"]] == [(0, 0), (1, 0), (2, 0)]
    assert verify_shardset(out).ok
    # reopen: everything recorded verifies, nothing to write, no tar touched
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = writer(out)
    assert again.open() == []
    assert again.finish() == doc
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # damage one shard, lose another: both are redone, byte-identical
    victim = out / "synth-r000-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "synth-r000-000002.tar").unlink()
    third = writer(out)
    todo = third.open()
    assert todo == [1, 2] and not victim.exists()  # the damaged file is gone before it is redone
    fill(third, todo)
    assert third.finish()["shards"] == doc["shards"]


def test_a_torn_tar_tmp_is_never_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "set"
    # a process killed (SIGKILL) between writing shard 1's tmp file and renaming it
    script = (
        "import os, signal, sys\n"
        "from d4ir_pipeline.shardset.writer import ShardSetWriter\n"
        "w = ShardSetWriter(out=sys.argv[1], kind='d4ir-shardset', header={'config_hash': 'h1'}, num_shards=3)\n"
        "w.open()\n"
        "w.write('a', [('json', b'{}'), ('degraded.png', b'x')])\n"
        "w.flush_shard(0)\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.write('b', [('json', b'{}')])\n"
        "w.flush_shard(1)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert (out / "synth-r000-000001.tar.tmp").is_file()
    doc = json.loads((out / "shardset.json").read_text())
    assert [s["name"] for s in doc["shards"]] == ["synth-r000-000000.tar"] and doc["complete"] is False
    rep = verify_shardset(out)
    assert rep.ok and rep.leftovers == ["synth-r000-000001.tar.tmp"] and not rep.unlisted
    # reopening removes the torn file and redoes its shard
    w = ShardSetWriter(out=out, kind=SHARDSET_KIND, header={"config_hash": "h1"}, num_shards=3)
    assert w.open() == [1, 2] and not (out / "synth-r000-000001.tar.tmp").exists()
    # a write that fails in-process leaves no tmp file and records nothing
    w.write("b", [("json", b"{}")])

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        w.flush_shard(1)
    monkeypatch.undo()
    assert not list(out.glob("*.tmp")) and 1 not in w.entries
    assert [s["name"] for s in json.loads((out / "shardset.r000.json").read_text())["shards"]] == [
        "synth-r000-000000.tar"
    ]


def test_another_config_hash_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    w = writer(out)
    fill(w, w.open())
    w.finish()
    other = writer(out, head=header("h2", seed=1), where="`output.dir` = 'x'", hint="use a new output.dir")
    with pytest.raises(
        ShardSetError,
        match=r"`output.dir` = 'x' holds a shard set made with another config \(config_hash h1, this run h2; "
        r"differing: config\.seed\)\. Mixing them is refused: use a new output\.dir",
    ):
        other.open()
    assert verify_shardset(out).ok  # the refusal touched nothing
    todo = other.open(overwrite=True)
    assert todo == [0, 1, 2] and not list(out.glob("*.tar"))
    fill(other, todo)
    doc = other.finish()
    assert doc["complete"] and doc["config_hash"] == "h2" and doc["config"] == {"seed": 1}


def test_rank_listings_merge_and_a_narrower_rerun_reuses_other_ranks_shards(tmp_path: Path) -> None:
    out = tmp_path / "set"
    r0, r1 = writer(out, rank=0, world=2), writer(out, rank=1, world=2)
    assert r0.open() == [0, 2] and r1.open() == [1]
    with pytest.raises(ValueError, match="not rank 0's"):
        r0.flush_shard(1)
    fill(r0, [0])
    part = merge_shardset(out)
    assert part["complete"] is False and part["pending_ranks"] == [0, 1] and part["num_shards"] == 1
    fill(r1, [1])
    fill(r0, [2])
    assert r0.finish()["done"] is True  # a rank of several returns its listing; merging is the caller's
    doc = merge_shardset(out)
    assert doc["complete"] and doc["world_size"] == 2 and doc["num_samples"] == 9
    assert [s["name"] for s in doc["shards"]] == [
        "synth-r000-000000.tar",
        "synth-r001-000001.tar",
        "synth-r000-000002.tar",
    ]
    # the same set on one rank: rank 1's recorded shard is reused, its stale listing removed by the merge
    one = writer(out)
    assert one.open() == []
    merged = one.finish()
    assert merged["complete"] and merged["world_size"] == 1 and merged["shards"] == doc["shards"]
    assert not (out / "shardset.r001.json").exists()


def test_a_rerun_that_differs_only_in_provenance_keeps_shardset_json(tmp_path: Path) -> None:
    """Its sha256 is the set's identity downstream: a rerun from another install must not orphan label caches."""
    out = tmp_path / "set"
    models = {"sd": "demo_sd@unet-sha256:ab", "sd_source": "/install/a/demo_sd"}
    first = writer(out, head={**header(), "models": models, "versions": {"torch": "2.14.1"}})
    fill(first, first.open()[:2])
    assert merge_shardset(out)["complete"] is False
    fill(first, first.open())  # the rest: what the set holds changes, so shardset.json follows
    assert first.finish()["complete"] is True
    before = (out / "shardset.json").read_bytes()
    # the same shards from another checkout, package versions and an output-neutral config key
    moved = {**header(), "config": {"seed": 0, "workers": 4}, "versions": {"torch": "2.15.0"},
             "models": {**models, "sd_source": "/install/b/demo_sd"}}  # fmt: skip
    stale = out / "shardset.r001.json"  # a listing of a rank beyond the world size: the merge still removes it
    stale.write_bytes((out / "shardset.r000.json").read_bytes())
    again = writer(out, head=moved)
    assert again.open() == []
    assert again.finish() == json.loads(before)
    assert (out / "shardset.json").read_bytes() == before and not stale.exists()
    # another model id is not provenance: written
    other = writer(out, head={**header(), "models": {**models, "sd": "demo_sd@unet-sha256:cd"}})
    assert other.open() == []
    assert other.finish()["models"]["sd"] == "demo_sd@unet-sha256:cd"
    assert json.loads((out / "shardset.json").read_text())["models"]["sd"] == "demo_sd@unet-sha256:cd"


def test_label_cache_is_one_rank_with_its_own_listing(tmp_path: Path) -> None:
    out = tmp_path / "labels"
    w = label_writer(out)
    assert w.open() == [0, 1]
    for key, files in samples(0):
        w.write(key, [("teacher.npy", files[1][1])])
    w.header["skipped"] = 2
    w.flush_shard(0)
    doc, listed = read_listing(out / "labels.json", LABELS_KIND)
    assert doc["complete"] is False and doc["skipped"] == 2 and doc["teacher"]["id"] == "t1"
    assert [set(s) for s in doc["shards"]] == [{"name", "samples", "bytes", "sha256"}]  # the label-cache entry
    assert listed[0].name == "synth-r000-000000.tar" and listed[0].samples == 3
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "synth-r000-000000.tar"]  # no rank listing
    # reopen: shard 0 reused, the running total carried over; finishing early is refused
    again = label_writer(out)
    assert again.open() == [1] and again.header["skipped"] == 2
    with pytest.raises(ShardSetError, match=r"never wrote its shard\(s\) \[1\]"):
        again.finish()
    again.write("s01-0", [("teacher.npy", b"x")])
    again.flush_shard(1)
    done = again.finish()
    assert done["complete"] is True and [s["name"] for s in done["shards"]] == LABEL_NAMES
    with pytest.raises(ShardSetError, match=r"label cache made with another config \(teacher\.id t1, this run t2"):
        label_writer(out, head=label_header("t2")).open()


def test_label_cache_written_by_the_old_code_still_reads_and_resumes(tmp_path: Path) -> None:
    """Before the shared writer, label tars came from webdataset's TarWriter and labels.json was hand-built."""
    import webdataset as wds

    out = tmp_path / "labels"
    out.mkdir()
    entries = []
    for i, name in enumerate(LABEL_NAMES):
        with open(out / name, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tw:
            for key, files in samples(i):
                tw.write({"__key__": key, "teacher.npy": files[1][1]})
        entries.append(
            {"name": name, "samples": 3, "bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
        )
    old = {"kind": "d4ir-labels", "version": 1, "complete": True, "shards": entries, **label_header(skipped=1)}
    atomic_write_json(out / "labels.json", old)
    w = label_writer(out)
    assert w.open() == [] and w.header["skipped"] == 1
    assert w.finish()["shards"] == entries
    assert [k for k, _ in iter_tar(out / LABEL_NAMES[1])] == [k for k, _ in samples(1)]


def test_identical_input_gives_byte_identical_reproducible_tars(tmp_path: Path) -> None:
    shas = []
    for name in ("a", "b"):
        w = writer(tmp_path / name, num=1)
        fill(w, w.open())
        shas.append(sha256_file(tmp_path / name / "synth-r000-000000.tar"))
    assert shas[0] == shas[1]
    with tarfile.open(tmp_path / "a" / "synth-r000-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{k}.{e}" for k, files in samples(0) for e, _ in files]  # in write order
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name


def test_writer_refuses_samples_the_readers_would_change(tmp_path: Path) -> None:
    w = writer(tmp_path / "set", num=1)
    with pytest.raises(RuntimeError, match="open"):
        w.write("k", [("json", b"{}")])
    w.open()
    for key, files in [
        ("a.b", [("json", b"")]),
        ("a/b", [("json", b"")]),
        ("", [("json", b"")]),
        ("k", [("PNG", b"")]),
        ("k", [("json", b""), ("json", b"")]),
        ("k", []),
    ]:
        with pytest.raises(ValueError, match="sample"):
            w.write(key, files)
    w.write("k", [("json", b"{}")])
    with pytest.raises(ValueError, match="occurs twice"):
        w.write("k", [("json", b"{}")])
    with pytest.raises(ValueError, match="lacks the identity"):
        ShardSetWriter(out=tmp_path / "x", kind=SHARDSET_KIND, header={}, num_shards=1)
    with pytest.raises(ValueError, match="`kind`"):
        ShardSetWriter(out=tmp_path / "x", kind="d4ir-shardset-rank", header={"config_hash": "h"}, num_shards=1)


# ---------------------------------------------------------------------------------------
# reader


def test_truncated_tar_raises_the_readers_error_naming_the_key(tmp_path: Path) -> None:
    w = writer(tmp_path / "set", num=1)
    fill(w, w.open())
    path = tmp_path / "set" / "synth-r000-000000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[3].offset_data + 100  # inside sample 1's second file
    path.write_bytes(path.read_bytes()[:cut])
    got = []
    with pytest.raises(ShardReadError, match="while reading key s00-1") as e:
        for key, files in iter_tar(path):
            got.append(key)
            assert set(files) == {"json", "degraded.png"}
    assert got == ["s00-0"] and e.value.key == "s00-1" and isinstance(e.value, ShardSetError)
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardReadError, match="before the first sample") as e:
        list(iter_tar(tmp_path / "junk.tar"))
    assert e.value.key is None


def test_reader_keys_follow_webdataset(tmp_path: Path) -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ("k.json", "k.degraded.png", "dir/k.Clean.PNG", "a.b/c.d", "noext", ".hidden", "x."):
        want = base_plus_ext(name)
        assert split_key(name) == (want[0], (want[1] or "").lower()), name

    def tar_of(members: list[tuple[str, bytes | None]]) -> Path:
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    # directories and names without an extension are skipped, as webdataset does
    path = tar_of([("d", None), ("a.json", b"1"), ("a.Degraded.PNG", b"2"), ("README", b"x"), ("b.json", b"3")])
    assert list(iter_tar(path)) == [("a", {"json": b"1", "degraded.png": b"2"}), ("b", {"json": b"3"})]
    with pytest.raises(ShardReadError, match=r"while reading key a \('a\.json' occurs twice in the sample\)"):
        list(iter_tar(tar_of([("a.json", b"1"), ("a.json", b"2")])))
    apart = tar_of([("a.json", b"1"), ("b.json", b"2"), ("a.png", b"3")])
    assert [k for k, _ in iter_tar(apart)] == ["a", "b", "a"]  # streaming: a sample is a run of adjacent files
    with pytest.raises(ShardReadError, match="key 'a' occurs twice in the shard"):
        read_shard(apart)
