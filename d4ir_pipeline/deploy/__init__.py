"""Ship a model: export it (ONNX fp32 / fp16 / int8, torch.export) and run it on any image set.

Data flow: a model folder (``save_model``), a weights file plus its architecture, or an
exported ``.onnx`` -> :mod:`.runner` (one callable, any backend) -> :mod:`.restore`
(images in, restored PNGs out, tiled under a memory budget) and :mod:`.export` (graph
surgery in :mod:`.graph`, verification, quantisation, the model card in :mod:`.card`).
ONNX needs the ``[export]`` extra: ``pip install 'd4ir-pipeline[export]'``. docs/DEPLOY.md.
"""

from __future__ import annotations

# the stage functions stay in their modules (deploy.export.export, deploy.restore.restore): re-exported
# here they would shadow the modules of the same name
from d4ir_pipeline.deploy.demo import demo_step
from d4ir_pipeline.deploy.export import ExportConfig, ExportError, ExportResult
from d4ir_pipeline.deploy.onnx_model import INSTALL_HINT, OnnxModel, require
from d4ir_pipeline.deploy.restore import EXIT_CODES, RestoreConfig, RestoreResult
from d4ir_pipeline.deploy.runner import ModelConfig, Runner, load_runner

__all__ = [
    "EXIT_CODES",
    "INSTALL_HINT",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "ModelConfig",
    "OnnxModel",
    "RestoreConfig",
    "RestoreResult",
    "Runner",
    "demo_step",
    "load_runner",
    "require",
]
