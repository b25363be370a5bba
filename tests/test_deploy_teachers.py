"""`d4ir export` of teachers: the adapted ones (MPRNet, WGWS-Net) verified at any size, the known limits named."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from d4ir_pipeline import testing
from d4ir_pipeline.deploy import ExportConfig, ExportError, ModelConfig, OnnxModel
from d4ir_pipeline.deploy.export import export, known_limit
from d4ir_pipeline.deploy.graph import AnySize
from d4ir_pipeline.deploy.runner import load_torch_model
from d4ir_pipeline.models import AdaptedModel, build_model, model_io, save_model

# the teachers an export goes through the I/O adapter for (MPRNet: output index; WGWS-Net: a weather), and
# one with a known limit. Restormer, PromptIR and DRSformer export through the same path as
# the students (measured in docs/DEPLOY.md; each export is 40-60 s here, so the suite does not repeat them).
# The refusal end to end for TransWeather (12 s; DehazeFormer and Histoformer take 50 s each to reach theirs,
# measured in docs/DEPLOY.md), and the lookup that names each known limit below.
TEACHER_EXPORTS = {"mprnet_s": None, "wgws_s": None, "transweather_s": "decoder crops"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEACHER_EXPORTS))
def test_adapted_teachers_export_at_any_size_and_the_others_name_their_known_limit(tmp_path, name):
    model = testing.randomised(name, 0, residual_std=0.5, norm_std=0.2)
    save_model(model, tmp_path / "model")
    weather = "rain" if name.startswith("wgws") else ""
    cfg = ExportConfig(out=str(tmp_path / "export"), model=ModelConfig(checkpoint=str(tmp_path / "model"),
                       weather=weather), fp16=False, int8=False, pt2=name == "wgws_s")  # fmt: skip
    if limit := TEACHER_EXPORTS[name]:
        with pytest.raises(ExportError, match=f"known limit of .*{limit}"):
            export(cfg)
        assert not (tmp_path / "export").exists()
        return
    result = export(cfg)  # verified inside: ONNX Runtime (and model.pt2) vs PyTorch at 64x64, 97x131, 256x192
    assert result.max_abs_diff <= 1e-4
    assert (result.pt2_max_abs_diff is not None and result.pt2_max_abs_diff <= 1e-4) == cfg.pt2
    sess = OnnxModel(tmp_path / "export" / "model.onnx")
    runner_model = load_torch_model(cfg.model)[0]  # what restore runs: through the teacher's I/O adapter
    x = torch.rand(1, 3, 75, 61, generator=torch.Generator().manual_seed(3))  # a size the export never saw
    with torch.no_grad():
        want = runner_model(x)
    assert np.abs(sess.run(x.numpy()) - want.numpy()).max() <= 1e-4
    adapter = result.info["model"]["adapter"]  # on the card too
    assert adapter["weather"] == (weather or None) and adapter["output_index"] == (0 if name == "mprnet_s" else None)
    assert "I/O adapter" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize(("name", "words"), [("transweather_s", "decoder crops"),
                                             ("dehazeformer_xs", "shifted-window"), ("histoformer_s", "sorts")])  # fmt: skip
def test_each_known_limit_is_named_through_the_adapter_and_the_padding(name, words):
    graph = AnySize(AdaptedModel(build_model(name), model_io(name)), 16)  # what torch.export is given
    assert re.search(f"known limit of {type(build_model(name)).__name__}: .*{words}", known_limit(graph))
    assert known_limit(AnySize(build_model("restormer_s"), 8)) == ""
