"""Stage two's teacher through its I/O adapter: ranges, output index, weather flag, identity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, model_io, save_model
from d4ir_pipeline.stage2.teacher import TeacherConfig, load_teacher, teacher_forward, teacher_identity


def _saved(tmp_path, name: str) -> TeacherConfig:
    torch.manual_seed(0)
    save_model(build_model(name), tmp_path / name)
    return TeacherConfig(checkpoint=str(tmp_path / name), dtype="float32")


def _x(h: int = 20, w: int = 28) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_dehazeformer_is_called_in_minus_one_one_and_read_back(tmp_path):
    cfg = _saved(tmp_path, "dehazeformer_xs")
    model, dtype = load_teacher(cfg, torch.device("cpu"))
    x = _x()
    with torch.no_grad():
        want = ((model(x * 2 - 1) + 1) / 2).clamp(0, 1)  # the registry default: [-1, 1] in and out
    assert torch.allclose(teacher_forward(model, x, dtype, cfg), want, atol=1e-6)
    # the config overrides the registry, and the identity follows it (label caches change with it)
    plain = dataclasses.replace(cfg, input_range="0,1", output_range="0,1")
    model2, _ = load_teacher(plain, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(teacher_forward(model2, x, dtype, plain), model(x).clamp(0, 1), atol=1e-6)
    assert teacher_identity(plain)["id"] != teacher_identity(cfg)["id"]
    assert teacher_identity(cfg)["io"]["input_range"] == "-1,1"


def test_mprnet_restoration_is_its_first_output(tmp_path):
    cfg = _saved(tmp_path, "mprnet_s")
    model, dtype = load_teacher(cfg, torch.device("cpu"))
    x = _x(16, 24)
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, list | tuple) and model_io("mprnet_s").output_index == 0
    assert torch.allclose(teacher_forward(model, x, dtype, cfg), outs[0].clamp(0, 1), atol=1e-6)


def test_non_blind_teacher_gets_its_weather_flag(tmp_path):
    cfg = _saved(tmp_path, "wgws_s")
    model, dtype = load_teacher(cfg, torch.device("cpu"))
    order = model.d4ir_io.weather_flag
    x = _x(16, 16)
    with pytest.raises(D4IRError, match="not blind"):
        teacher_forward(model, x, dtype, cfg)  # no weather from the config or the samples
    fixed = dataclasses.replace(cfg, weather=order[1])
    with torch.no_grad():
        flag = torch.tensor([float(w == order[1]) for w in order])
        want = model(x, flag).clamp(0, 1)
    assert torch.allclose(teacher_forward(model, x, dtype, fixed), want, atol=1e-6)
    per_sample = teacher_forward(model, x, dtype, cfg, weather=[order[1], order[0]])  # one weather per sample
    with torch.no_grad():
        other = model(x[1:], torch.tensor([float(w == order[0]) for w in order])).clamp(0, 1)
    assert torch.allclose(per_sample[:1], want[:1], atol=1e-6) and torch.allclose(per_sample[1:], other, atol=1e-6)
    with pytest.raises(D4IRError, match="knows"):
        load_teacher(dataclasses.replace(cfg, weather="fog"), torch.device("cpu"))
