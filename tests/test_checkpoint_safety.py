"""Safe loading of checkpoints that pickle harmless objects (issue 13 item 4): an allowlist, never weights_only=False."""

from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from d4ir_pipeline.models import CheckpointError, build_model, load_state_dict_file, load_weights


@dataclass
class Hyper:
    """A harmless class that is not on the allowlist."""

    lr: float = 1e-3


class WritesFile:
    """Unpickling this calls open(marker, 'w'): it creates a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    """Unpickling this calls os.system(...): it runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _weights() -> dict:
    return {"module." + k: v for k, v in build_model("rescnn", width=4, blocks=1).state_dict().items()}


def test_allowlisted_namespace_loads(tmp_path):
    sd = _weights()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "params": argparse.Namespace(lr=2e-4, nested=argparse.Namespace(seed=1))}, path)
    # the checkpoint really needs the allowlist: plain weights_only loading refuses it
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == {k.removeprefix("module.") for k in sd}
    load_weights(build_model("rescnn", width=4, blocks=1), path)
    # the allowlist is scoped to our call: it did not leak into torch's global state
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_unknown_global_is_refused_with_its_name_and_how_to_proceed(tmp_path):
    path = tmp_path / "hyper.pth"
    torch.save({"state_dict": _weights(), "hparams": Hyper()}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    msg = str(e.value)
    assert f"`{__name__}.Hyper`" in msg and str(path) in msg
    assert "argparse.Namespace" in msg  # what is allowed
    assert "extra_safe_globals" in msg and "safetensors" in msg  # how to proceed
    # the named way to proceed works
    assert load_state_dict_file(path, extra_safe_globals=[Hyper])


def test_every_offending_global_is_named(tmp_path):
    path = tmp_path / "two.pth"
    torch.save({"state_dict": _weights(), "a": Hyper(), "b": pickle.PickleBuffer}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert "Hyper" in str(e.value) and "PickleBuffer" in str(e.value)


@pytest.mark.parametrize("payload", [WritesFile, RunsShell])
def test_malicious_pickle_runs_nothing(tmp_path, payload):
    # the payload really runs under a plain unpickler (so the check below means something)
    probe = tmp_path / "probe"
    obj = pickle.loads(pickle.dumps(payload(probe)))
    if hasattr(obj, "close"):
        obj.close()
    assert probe.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _weights(), "params": argparse.Namespace(x=1), "extra": payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("rescnn", width=4, blocks=1), path)
    assert not marker.exists()
    name = f"{open.__module__}.open" if payload is WritesFile else f"{os.system.__module__}.system"
    assert f"`{name}`" in str(e.value)


def test_legacy_pickle_format_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": _weights(), "x": WritesFile(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=f"`{open.__module__}.open`"):
        load_state_dict_file(path)
    assert not marker.exists()
