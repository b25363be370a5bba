"""The multi-weather teacher zoo (issue 13): official key layouts, containers, output quirks, the I/O adapter."""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from d4ir_pipeline.models import (
    TEACHER_CHECKPOINTS,
    TEACHER_IO,
    TEACHERS,
    ModelIO,
    ModelIOError,
    adapted_forward,
    build_model,
    count_params,
    load_weights,
    model_io,
    models_command,
)

DATA = Path(__file__).resolve().parent / "data"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "MODELS.md"

# Keys and shapes of the official modules at their released sizes, extracted from the
# official architecture files (the "source" / "config" fields say which) in a scratch folder.
OFFICIAL = json.loads(gzip.decompress((DATA / "official_teacher_keys.json.gz").read_bytes()))

# official entry -> (our registry name, kwargs)
OURS = {
    "histoformer": ("histoformer", {}),
    "transweather": ("transweather", {}),
    "mprnet": ("mprnet", {}),
    "drsformer": ("drsformer", {}),
    "drsformer_nomefc": ("drsformer", {"mefc": False}),
    **{f"dehazeformer_{v}": (f"dehazeformer_{v}", {}) for v in "tsbml"},
    "wgws": ("wgws", {}),
    "wgws_setting1": ("wgws_setting1", {}),
}

# Parameter counts of the full-size registry entries (also in docs/MODELS.md).
FULL_PARAMS = {
    "histoformer": 16_615_100,
    "transweather": 38_052_078,
    "mprnet": 3_637_249,
    "drsformer": 33_655_424,
    "dehazeformer_t": 687_404,
    "dehazeformer_s": 1_284_884,
    "dehazeformer_b": 2_517_612,
    "dehazeformer_m": 4_635_952,
    "dehazeformer_l": 25_451_652,
    "wgws": 9_351_964,
    "wgws_setting1": 7_575_354,
}

TINY = ["histoformer_s", "transweather_s", "mprnet_s", "drsformer_s", "dehazeformer_xs", "wgws_s"]


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Noise on every weight (several layers start as zeros); WGWS indicators spread around the 0.1 cut."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "indicator" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _perturb(build_model(name), seed).eval()


# ---------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_keeps_an_odd_input_shape(name):
    model = _tiny(name)
    x = torch.rand(2, 3, 37, 53)
    io = model_io(name)
    with torch.no_grad():
        raw = model(x) if io.weather_flag is None else model(x, [0, 1, 0])
        y = adapted_forward(model, x, io, weather="rain")
    outs = raw if isinstance(raw, list) else [raw]
    assert all(o.shape == x.shape for o in outs)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("entry", sorted(OURS))
def test_full_size_keys_and_shapes_equal_the_official(entry):
    name, kwargs = OURS[entry]
    with torch.device("meta"):
        sd = build_model(name, **kwargs).state_dict()
    ours = {k: list(v.shape) for k, v in sd.items()}
    official = OFFICIAL[entry]["keys"]
    missing, extra = sorted(set(official) - set(ours)), sorted(set(ours) - set(official))
    assert not missing and not extra, f"{entry}: missing {missing[:5]}, unexpected {extra[:5]}"
    bad = [(k, ours[k], official[k]) for k in official if ours[k] != official[k]]
    assert not bad, f"{entry}: shape conflicts {bad[:5]}"


@pytest.mark.parametrize(("name", "count"), sorted(FULL_PARAMS.items()))
def test_full_size_parameter_counts_are_pinned(name, count):
    with torch.device("meta"):
        model = build_model(name)
    assert count_params(model) == count == OFFICIAL[name]["params"]
    assert f"{count:,}" in DOCS.read_text(encoding="utf-8"), f"docs/MODELS.md should state {count:,}"


def test_histoformer_default_is_the_released_allweather_config_not_the_class_default():
    with torch.device("meta"):
        released, class_default = build_model("histoformer"), build_model("histoformer", dim=48)
    assert released.patch_embed.proj.weight.shape[0] == 36 and len(released.encoder_level2) == 4
    assert class_default.patch_embed.proj.weight.shape[0] == 48
    # ffn 2.667: int(36 * 2.667) = 96 hidden channels; the class default 2.66 gives 95, which cannot be split
    assert released.encoder_level1[0].ffn.project_in.weight.shape[0] == 192
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model("histoformer", ffn_expansion_factor=2.66)


def test_mprnet_shares_one_prelu_like_the_official_code():
    model = build_model("mprnet_s")
    prelu_keys = [k for k in model.state_dict() if k.endswith("body.1.weight")]
    assert len(prelu_keys) > 10
    assert len({id(m) for m in model.modules() if isinstance(m, nn.PReLU)}) == 1


def test_wgws_flag_selects_weather_specific_residuals_per_batch_or_per_sample():
    model = _tiny("wgws_s", 3)
    x = torch.rand(3, 3, 16, 20)
    flags = torch.eye(3)
    with torch.no_grad():
        per_weather = [model(x, flags[k].tolist()) for k in range(3)]
        per_sample = model(x, flags)  # sample i gets weather i
    assert (per_weather[0] - per_weather[1]).abs().max() > 1e-4  # the flag changes the output
    for i in range(3):
        torch.testing.assert_close(per_sample[i], per_weather[i][i], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one-hot weather flag"):
        model(x, [1, 0])


def test_wgws_indicator_below_threshold_switches_a_residual_off():
    model = _tiny("wgws_s", 4)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "B2_indicator" in name:
                p.fill_(0.05)
        off = model(x, [0, 1, 0])
        for name, p in model.named_parameters():
            if "B2_residual" in name:
                p.add_(1.0)  # a residual that is off cannot matter
        assert torch.equal(off, model(x, [0, 1, 0]))


def test_drsformer_without_mefc_matches_the_200l_spa_layout():
    with torch.device("meta"):
        keys = set(build_model("drsformer", mefc=False).state_dict())
    assert not any(k.startswith(("encoder_level0.", "refinement.")) for k in keys)


# ---------------------------------------------------------------------------------------
# checkpoint containers of the released files


def _container(kind: str, sd: dict) -> object:
    dp = {"module." + k: v for k, v in sd.items()}
    return {
        "params": {"params": sd},  # Histoformer, DRSformer (BasicSR)
        "dataparallel": dp,  # TransWeather: torch.save(nn.DataParallel(net).state_dict(), "best")
        "state_dict+optimizer": {
            "epoch": 250,
            "state_dict": dp,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}},
        },
        "state_dict": {"state_dict": dp},  # DehazeFormer
        "raw": sd,  # WGWS-Net
        "weatherdiffusion": {  # WeatherDiffusion-style: Namespaces next to the weights
            "epoch": 1,
            "step": 10,
            "state_dict": dp,
            "params": argparse.Namespace(seed=61, sampling_timesteps=25),
            "config": argparse.Namespace(data=argparse.Namespace(image_size=64), device=torch.device("cpu")),
        },
    }[kind]


@pytest.mark.parametrize(
    ("name", "kind", "filename"),
    [
        ("histoformer_s", "params", "net_g_best.pth"),
        ("transweather_s", "dataparallel", "best"),  # no suffix: sniffed as a torch zip file
        ("mprnet_s", "state_dict+optimizer", "model_deraining.pth"),
        ("drsformer_s", "params", "deraining.pth"),
        ("dehazeformer_xs", "state_dict", "dehazeformer-b.pth"),
        ("wgws_s", "raw", "Setting2_K1.pth"),
        ("mprnet_s", "weatherdiffusion", "WeatherDiff64.pth.tar"),
    ],
)
def test_released_container_forms_load_strictly(tmp_path, name, kind, filename):
    src = _tiny(name, 1)
    path = tmp_path / filename
    torch.save(_container(kind, src.state_dict()), path)
    dst = build_model(name)
    report = load_weights(dst, path)
    assert not report["missing"] and not report["unexpected"]
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# the I/O adapter


class Identity(nn.Module):
    def forward(self, x):
        return x


class Stages(nn.Module):
    """Returns three outputs like MPRNet: [restoration, stage 2, stage 1]."""

    def forward(self, x):
        return [x + 1, x + 2, x + 3]


class FlagEcho(nn.Module):
    """A non-blind model: adds the index of the flagged weather, and records each flag it got."""

    def __init__(self):
        super().__init__()
        self.seen: list[list[int]] = []

    def forward(self, x, flag):
        self.seen.append(list(flag))
        return x + 10 * flag.index(1)


class NeedsMultiple(nn.Module):
    def forward(self, x):
        assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0, tuple(x.shape)
        return x


def test_range_adapter_round_trips():
    x = torch.rand(2, 3, 9, 11)
    for inp, out in [("0,1", "0,1"), ("-1,1", "-1,1")]:
        torch.testing.assert_close(adapted_forward(Identity(), x, ModelIO(input_range=inp, output_range=out)), x)
    # the model really sees [-1, 1]
    seen = adapted_forward(Identity(), x, ModelIO(input_range="-1,1", output_range="0,1"))
    torch.testing.assert_close(seen, x * 2 - 1)
    assert seen.min() < 0
    # [-1, 1] output read back on the [0, 1] scale
    torch.testing.assert_close(adapted_forward(Identity(), x * 2 - 1, ModelIO(output_range="-1,1")), x)


def test_dehazeformer_adapter_equals_the_official_test_script():
    model = _tiny("dehazeformer_xs", 2)
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        official = model(x * 2 - 1) * 0.5 + 0.5  # test.py: inputs x * 2 - 1, outputs * 0.5 + 0.5
        ours = adapted_forward(model, x, model_io("dehazeformer_b"))
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)


def test_output_index_picks_the_restoration():
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(adapted_forward(Stages(), x, ModelIO(output_index=0)), x + 1)
    torch.testing.assert_close(adapted_forward(Stages(), x, ModelIO(output_index=2)), x + 3)
    with pytest.raises(ModelIOError, match="set `output_index`"):
        adapted_forward(Stages(), x, ModelIO())
    with pytest.raises(ModelIOError, match="returned 3 outputs"):
        adapted_forward(Stages(), x, ModelIO(output_index=3))
    with pytest.raises(ModelIOError, match="not a list"):
        adapted_forward(Identity(), x, ModelIO(output_index=0))
    model = _tiny("mprnet_s")
    with torch.no_grad():
        torch.testing.assert_close(adapted_forward(model, x, model_io("mprnet")), model(x)[0])


def test_weather_flag_fixed_and_per_sample():
    io = ModelIO(weather_flag=("snow", "rain", "haze"))
    x = torch.zeros(4, 1, 2, 2)
    model = FlagEcho()
    assert torch.equal(adapted_forward(model, x, io, weather="haze"), x + 20)
    assert model.seen == [[0, 0, 1]]
    model.seen.clear()
    y = adapted_forward(model, x, io, weather=["rain", "snow", "rain", "haze"])
    assert y[:, 0, 0, 0].tolist() == [10.0, 0.0, 10.0, 20.0]  # each sample got its own weather, order kept
    assert sorted(model.seen) == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # one forward per weather
    with pytest.raises(ModelIOError, match="not blind"):
        adapted_forward(model, x, io)
    with pytest.raises(ModelIOError, match="'fog'.*knows"):
        adapted_forward(model, x, io, weather="fog")
    with pytest.raises(ModelIOError, match="3 entries for a batch of 4"):
        adapted_forward(model, x, io, weather=["rain"] * 3)
    # a blind model ignores the weather, so callers can always pass it
    assert torch.equal(adapted_forward(Identity(), x, ModelIO(), weather="rain"), x)


def test_wgws_adapter_per_sample_equals_per_weather_batches():
    model = _tiny("wgws_s", 5)
    io = model_io("wgws_s")
    x = torch.rand(3, 3, 18, 22)
    with torch.no_grad():
        mixed = adapted_forward(model, x, io, weather=["haze", "snow", "haze"])
        haze = adapted_forward(model, x, io, weather="haze")
        snow = adapted_forward(model, x, io, weather="snow")
    torch.testing.assert_close(mixed[0], haze[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], snow[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2], haze[2], rtol=0, atol=1e-6)


def test_pad_multiple_pads_and_crops():
    x = torch.rand(1, 3, 13, 21)
    y = adapted_forward(NeedsMultiple(), x, ModelIO(pad_multiple=8))
    assert torch.equal(y, x)
    with pytest.raises(AssertionError):
        adapted_forward(NeedsMultiple(), x, ModelIO())


def test_model_io_validates_its_fields():
    with pytest.raises(ModelIOError, match="input_range"):
        ModelIO(input_range="0,255")
    with pytest.raises(ModelIOError, match="pad_multiple"):
        ModelIO(pad_multiple=0)
    with pytest.raises(ModelIOError, match="unique"):
        ModelIO(weather_flag=("rain", "rain"))
    with pytest.raises(ModelIOError, match="non-empty tuple"):
        ModelIO(weather_flag="rain")
    assert ModelIO(weather_flag=["rain", "snow"]).weather_flag == ("rain", "snow")


def test_every_teacher_has_io_defaults_matching_its_model():
    assert set(TEACHER_IO) == set(TEACHERS)
    with torch.device("meta"):
        for name in TEACHERS:
            assert model_io(name).pad_multiple == build_model(name).multiple, name
    assert model_io("dehazeformer_b").input_range == model_io("dehazeformer_b").output_range == "-1,1"
    assert model_io("transweather").input_range == "-1,1" and model_io("transweather").output_range == "0,1"
    assert model_io("mprnet").output_index == 0
    assert model_io("wgws").weather_flag == ("snow", "rain", "haze")  # testing_model_Seting2.py
    assert model_io("nafnet_s") == ModelIO() and model_io("my.pkg:Net") == ModelIO()
    with pytest.raises(ValueError, match="unknown model"):
        model_io("histofromer")


def test_models_command_lists_the_expected_checkpoint():
    names = ["histoformer", "wgws", "dehazeformer_t", "rescnn"]
    res = CliRunner().invoke(models_command, [arg for n in names for arg in ("--name", n)] + ["--json", "--size", "64"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["histoformer"]["params"] == FULL_PARAMS["histoformer"] and rows["histoformer"]["macs"] > 0
    assert rows["histoformer"]["checkpoint"] == TEACHER_CHECKPOINTS["histoformer"]
    assert "net_g_best.pth" in rows["histoformer"]["checkpoint"]
    assert rows["wgws"]["io"]["weather_flag"] == ["snow", "rain", "haze"]
    assert rows["rescnn"]["checkpoint"] == "" and rows["rescnn"]["role"] == "student"
    table = CliRunner().invoke(models_command, ["--name", "dehazeformer_t"])
    assert re.search(r"dehazeformer_t\s+teacher\s+DehazeFormer\s+687\.40K\s+\S+\s+dehazeformer-t\.pth", table.output)
