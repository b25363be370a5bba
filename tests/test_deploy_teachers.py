"""`d4ir export` of teachers: the adapted ones verified at any size (torch.export or the TorchScript tracer)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from d4ir_pipeline import testing
from d4ir_pipeline.deploy import ExportConfig, ExportError, ModelConfig, OnnxModel
from d4ir_pipeline.deploy.budget import DEFAULT_BYTES_PER_PIXEL, activation_bytes_per_pixel
from d4ir_pipeline.deploy.export import export, known_limit
from d4ir_pipeline.deploy.graph import AnySize
from d4ir_pipeline.deploy.runner import load_torch_model
from d4ir_pipeline.models import AdaptedModel, build_model, model_io, save_model

# The teachers an export goes through the I/O adapter for (MPRNet: output index; WGWS-Net: a weather;
# TransWeather, DehazeFormer: value ranges), the last two also through the TorchScript tracer (torch.export
# cannot prove their shapes: no model.pt2). Restormer, PromptIR and DRSformer export through the same path as
# the students, and Histoformer is refused after 50 s of exporting (measured in docs/DEPLOY.md; the suite
# checks the lookup that names its limit below).
TEACHER_EXPORTS = {
    "mprnet_s": "dynamo",
    "wgws_s": "dynamo",
    "transweather_s": "TorchScript",
    "dehazeformer_xs": "TorchScript",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEACHER_EXPORTS))
def test_adapted_teachers_export_at_any_size_with_the_adapter_in_the_graph(tmp_path, name):
    model = testing.randomised(name, 0, residual_std=0.5, norm_std=0.2)
    save_model(model, tmp_path / "model")
    weather = "rain" if name.startswith("wgws") else ""
    cfg = ExportConfig(out=str(tmp_path / "export"), model=ModelConfig(checkpoint=str(tmp_path / "model"),
                       weather=weather), fp16=False, int8=False, pt2=name != "mprnet_s")  # fmt: skip
    result = export(cfg)  # verified inside: ONNX Runtime (and model.pt2) vs PyTorch at 64x64, 97x131, 256x192
    assert result.max_abs_diff <= 1e-4 and TEACHER_EXPORTS[name] in result.info["onnx"]["exporter"]
    traced = TEACHER_EXPORTS[name] == "TorchScript"
    assert result.info["onnx"]["traced"] is traced
    assert (tmp_path / "export" / "model.pt2").exists() == (cfg.pt2 and not traced)
    if traced:  # the card says why there is no model.pt2
        assert "known limit of" in (tmp_path / "export" / "README.md").read_text()
    sess = OnnxModel(tmp_path / "export" / "model.onnx")
    runner_model = load_torch_model(cfg.model)[0]  # what restore runs: through the teacher's I/O adapter
    x = torch.rand(1, 3, 75, 61, generator=torch.Generator().manual_seed(3))  # a size the export never saw
    with torch.no_grad():
        want = runner_model(x)
    assert np.abs(sess.run(x.numpy()) - want.numpy()).max() <= 1e-4
    adapter = result.info["model"]["adapter"]  # on the card too
    assert adapter["weather"] == (weather or None) and adapter["output_index"] == (0 if name == "mprnet_s" else None)
    assert (adapter["input_range"] == "-1,1") == (name in ("transweather_s", "dehazeformer_xs"))
    assert "I/O adapter" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize(("name", "words"), [("transweather_s", "decoder crops"),
                                             ("dehazeformer_xs", "shifted-window"), ("histoformer_s", "sorts")])  # fmt: skip
def test_each_known_limit_is_named_through_the_adapter_and_the_padding(name, words):
    graph = AnySize(AdaptedModel(build_model(name), model_io(name)), 16)  # what torch.export is given
    assert re.search(f"known limit of {type(build_model(name)).__name__}: .*{words}", known_limit(graph))
    assert known_limit(AnySize(build_model("restormer_s"), 8)) == ""


class _FrozenWidth(torch.nn.Module):
    """Adds a row vector as wide as the input: torch.export cannot keep that width symbolic (int() of a size),
    and the TorchScript tracer freezes it to the example's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(int(x.shape[-1]))


def test_a_fallback_graph_that_froze_a_size_fails_verification_and_leaves_nothing(tmp_path, monkeypatch):
    from d4ir_pipeline.deploy import export as ex

    ident = {"id": "f" * 16, "path": str(tmp_path / "frozen"), "weights_sha256": "0" * 64, "spec": {"name": "frozen"}}
    monkeypatch.setattr(ex, "load_torch_model", lambda cfg: (_FrozenWidth().eval(), {}, ident))
    cfg = ExportConfig(out=str(tmp_path / "out"), model=ModelConfig(checkpoint="frozen"), fp16=False, int8=False)
    with pytest.raises(ExportError, match="ONNX Runtime cannot run the exported graph"):
        export(cfg)  # torch.export refuses, the tracer's graph fails at the first size unlike the example
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # (its CPU-made zeros cannot run on `meta` either: the activation measure falls back instead of crashing)
    assert activation_bytes_per_pixel(_FrozenWidth()) == DEFAULT_BYTES_PER_PIXEL
