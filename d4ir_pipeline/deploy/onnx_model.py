"""A thin ONNX Runtime runner: an exported ``model.onnx`` as a callable on (B, 3, H, W) tensors.

The exported graphs pad to the network's multiple inside the graph (see :mod:`.graph`),
so the runner only converts tensors: no padding, no resizing, any size. The optional
packages (``onnx``, ``onnxruntime``, ``onnxscript``) are the ``[export]`` extra; a
missing one raises ``ImportError`` with the install command.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from d4ir_pipeline.errors import D4IRError

__all__ = ["INSTALL_HINT", "META_PREFIX", "OnnxModel", "require", "providers_for"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'd4ir-pipeline[export]'"
META_PREFIX = "d4ir."  # keys of the metadata the exporter stores in the ONNX file


def require(module: str, *, what: str = "ONNX export and ONNX Runtime inference") -> ModuleType:
    """Import an optional package of the ``[export]`` extra or raise ``ImportError`` with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the optional package `{module}`, which is not installed ({e}). Install the "
            f"extra: {INSTALL_HINT}  (or: pip install onnx onnxruntime onnxscript)"
        ) from e


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` ('auto', 'cpu', 'cuda[:N]'), CPU last."""
    ort = require("onnxruntime")
    have = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in have:
        raise D4IRError(
            f"`device` = {device!r} but this onnxruntime has no CUDAExecutionProvider (have {have}); "
            "install onnxruntime-gpu or use device 'cpu'"
        )
    if device != "cpu" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An ONNX Runtime session called like a model: (B, 3, H, W) float tensor -> same-size float32 tensor."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int = 0):
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise D4IRError(f"ONNX model {str(self.path)!r} does not exist (or is not a file)")
        so = ort.SessionOptions()
        if threads > 0:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers are noise here
        # No memory pattern: ORT plans one block per input shape on top of its arena, which doubles the
        # peak of a restore (nafnet_s at 512 px, 1 thread: 473 -> 243 MiB; 1024 px: 1846 -> 926 MiB) and
        # buys nothing when every image has its own size; the latency was the same within noise.
        so.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers_for(device))
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own pybind exception types
            raise D4IRError(f"ONNX model {str(self.path)!r} cannot be loaded by ONNX Runtime ({e})") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise D4IRError(
                f"ONNX model {str(self.path)!r}: expected one (B, C, H, W) input and one output, got inputs "
                f"{[(i.name, i.shape) for i in inputs]} and outputs {[(o.name, o.shape) for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.meta = self.read_meta(self.session)
        self.multiple = int(self.meta.get("multiple", 1))
        self.bytes_per_pixel = float(self.meta["bytes_per_pixel"]) if "bytes_per_pixel" in self.meta else None
        self.providers = self.session.get_providers()

    @staticmethod
    def read_meta(session: Any) -> dict[str, Any]:
        """The ``d4ir.*`` metadata an export stored in the file (JSON values), without the prefix."""
        raw = session.get_modelmeta().custom_metadata_map
        out: dict[str, Any] = {}
        for k, v in raw.items():
            if k.startswith(META_PREFIX):
                try:
                    out[k[len(META_PREFIX) :]] = json.loads(v)
                except json.JSONDecodeError:
                    out[k[len(META_PREFIX) :]] = v
        return out

    def run(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float array -> (B, 3, H, W) float32 array."""
        y = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)})[0]
        return y.astype(np.float32, copy=False)

    def __call__(self, x: Any) -> Any:
        """Torch in, torch out (on the input's device), so tiled inference can call it like a module."""
        import torch

        y = self.run(x.detach().float().cpu().numpy())
        return torch.from_numpy(y).to(x.device)
