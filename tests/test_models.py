"""Model zoo: registry, official key layouts, any-size forward, checkpoints, tiling, cost."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import (
    STUDENTS,
    TEACHERS,
    CheckpointError,
    CheckpointMismatchError,
    adapted_forward,
    build_model,
    count_macs,
    count_params,
    known_models,
    load_model,
    load_state_dict_file,
    load_weights,
    model_io,
    model_spec,
    models_command,
    pad_to_multiple,
    save_model,
    tiled_forward,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "MODELS.md"

# Small kwargs for the official-size teachers (same structure, fast forward on a CPU).
SMALL = {
    "restormer": dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2)),
    "promptir": dict(
        dim=8,
        num_blocks=(1, 1, 1, 1),
        num_refinement_blocks=1,
        heads=(1, 1, 2, 2),
        prompt_dims=(8, 16, 24),
        prompt_sizes=(8, 4, 2),
    ),
    "nafnet": dict(width=8, middle_blk_num=1, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1)),
}
# The multi-weather teachers run here as their tiny presets (tests/test_teacher_zoo.py checks the full sizes).
_TINY_OF = {
    "histoformer": "histoformer_s",
    "transweather": "transweather_s",
    "mprnet": "mprnet_s",
    "drsformer": "drsformer_s",
    **{f"dehazeformer_{v}": "dehazeformer_xs" for v in "tsbml"},
    **{n: "wgws_s" for n in ("wgws", "wgws_setting1", "wgws_setting3")},
}
SMALL.update({full: dict(TEACHERS[tiny].keywords) for full, tiny in _TINY_OF.items()})

# Parameter counts of the official-size constructions (documented in docs/MODELS.md;
# Restormer 26.13M, PromptIR 35.59M, NAFNet-GoPro-width64 67.89M as in the papers).
OFFICIAL_PARAMS = {
    ("restormer", ()): 26_126_644,
    ("promptir", ()): 35_592_263,
    ("nafnet", ()): 29_159_715,
    (
        "nafnet",
        (("width", 64), ("middle_blk_num", 1), ("enc_blk_nums", (1, 1, 1, 28)), ("dec_blk_nums", (1, 1, 1, 1))),
    ): 67_888_835,  # noqa: E501
}


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init NAFNets are the identity (beta = gamma = 0): give every weight some noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, **SMALL.get(name, {}))


# ---------------------------------------------------------------------------------------
# registry


def test_registry_has_three_teacher_and_three_student_families():
    assert {"restormer", "nafnet", "promptir", "demo_teacher"} <= set(TEACHERS)
    assert {"nafnet_s", "rescnn", "unet_s"} <= set(STUDENTS)
    families = {type(_small(n)).__name__ for n in ("nafnet_s", "rescnn", "unet_s")}
    assert len(families) == 3


def test_unknown_name_lists_sorted_known_names():
    with pytest.raises(ValueError) as e:
        build_model("restormr")
    msg = str(e.value)
    assert "restormr" in msg and str(known_models()) in msg
    assert isinstance(e.value, D4IRError)


def test_module_class_spec_builds_and_records_its_spec():
    m = build_model("d4ir_pipeline.models.students:LocalCNN", width=4, layers=2)
    assert type(m).__name__ == "LocalCNN"
    assert model_spec(m) == {"name": "d4ir_pipeline.models.students:LocalCNN", "kwargs": {"width": 4, "layers": 2}}
    with pytest.raises(ValueError, match="cannot import module"):
        build_model("no_such_pkg.mod:Net")
    with pytest.raises(ValueError, match="has no attribute"):
        build_model("d4ir_pipeline.models.students:NoSuchNet")
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_model("rescnn", widht=3)


def test_model_spec_of_unbuilt_module_is_a_clear_error():
    with pytest.raises(ValueError, match="not built with build_model"):
        model_spec(nn.Conv2d(3, 3, 3))


# ---------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("name", known_models())
def test_every_registered_model_keeps_an_odd_input_shape(name):
    model = _perturb(_small(name)).eval()
    x = torch.rand(2, 3, 67, 93)
    with torch.no_grad():  # through the teacher I/O adapter: MPRNet returns 3 stages, WGWS-Net takes a flag
        y = adapted_forward(model, x, model_io(name), weather="rain")
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize(("up", "down"), [(1, 2), (1, 4), (2, 1)])
def test_resize_by_is_the_official_scale_factor_resize_to_the_bit(mode, up, down):
    # MPRNet's nn.Upsample(scale_factor=0.5 / 2) and WGWS-Net's F.interpolate(scale_factor=...) are written
    # resize_by (integer output sizes: an export keeps them symbolic); the pixels must not change
    from torch.nn import functional as F

    from d4ir_pipeline.models.tiling import resize_by

    align = False if mode == "bilinear" else None
    for h, w in [(8, 12), (36, 20), (4, 4)]:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        want = F.interpolate(x, scale_factor=up / down, mode=mode, align_corners=align)
        assert torch.equal(resize_by(x, up=up, down=down, mode=mode), want)


def test_gather_pad_is_f_pad_reflect_or_replicate_to_the_bit():
    # DehazeFormer's window pad (reflect; replicate where the official code would fail) written as gathers
    import itertools

    from torch.nn import functional as F

    from d4ir_pipeline.models.tiling import gather_pad

    for h, w in itertools.product(range(1, 6), range(1, 6)):
        x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h * 7 + w))
        for top, bottom, left, right in itertools.product(range(0, 7), repeat=4):
            small = max(top, bottom) >= h or max(left, right) >= w
            want = F.pad(x, (left, right, top, bottom), mode="replicate" if small else "reflect")
            assert torch.equal(gather_pad(x, top, bottom, left, right), want), (h, w, top, bottom, left, right)


def test_dehazeformer_window_pad_is_the_official_pad():
    # the official pads (ss, (ws - ss + pw) % ws) with pw = (ws - w % ws) % ws (no shift: (0, pw)); ours is
    # written as "up to the next multiple of ws after side + ss" (an exporter can prove that a multiple)
    import types

    from d4ir_pipeline.models.dehazeformer import Attention

    for ws, ss, shift in [(8, 4, True), (8, 0, False), (4, 2, True)]:
        for h, w in [(1, 1), (5, 9), (8, 8), (13, 20), (33, 7)]:
            x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h + w))
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            pad = (ss, (ws - ss + pw) % ws, ss, (ws - ss + ph) % ws) if shift else (0, pw, 0, ph)
            small = max(pad[2:]) >= h or max(pad[:2]) >= w
            want = torch.nn.functional.pad(x, pad, mode="replicate" if small else "reflect")
            fake = types.SimpleNamespace(window_size=ws, shift_size=ss)
            assert torch.equal(Attention._pad(fake, x, shift), want), (ws, ss, h, w)


def test_tiny_inputs_pad_with_replicate_when_reflect_cannot():
    x = torch.rand(1, 3, 3, 5)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (8, 8) and size == (3, 5)
    with torch.no_grad():
        assert _small("unet_s")(x).shape == x.shape


@pytest.mark.parametrize(("key", "count"), sorted(OFFICIAL_PARAMS.items()))
def test_official_size_parameter_counts_match_docs(key, count):
    name, kwargs = key
    with torch.device("meta"):  # no memory, no init time
        model = build_model(name, **dict(kwargs))
    assert count_params(model) == count
    assert f"{count:,}" in DOCS.read_text(encoding="utf-8"), f"docs/MODELS.md should state {count:,}"


# A sample of (key, shape) pairs of the official state_dicts (read from the official
# restormer_arch.py / NAFNet_arch.py / net/model.py and checked against them).
OFFICIAL_KEYS = {
    "restormer": {
        "patch_embed.proj.weight": (48, 3, 3, 3),
        "encoder_level1.0.norm1.body.weight": (48,),
        "encoder_level1.0.norm1.body.bias": (48,),
        "encoder_level1.0.attn.temperature": (1, 1, 1),
        "encoder_level1.0.attn.qkv.weight": (144, 48, 1, 1),
        "encoder_level1.0.attn.qkv_dwconv.weight": (144, 1, 3, 3),
        "encoder_level1.0.ffn.project_in.weight": (254, 48, 1, 1),
        "encoder_level1.0.ffn.project_out.weight": (48, 127, 1, 1),
        "down1_2.body.0.weight": (24, 48, 3, 3),
        "latent.7.attn.temperature": (8, 1, 1),
        "up4_3.body.0.weight": (768, 384, 3, 3),
        "reduce_chan_level3.weight": (192, 384, 1, 1),
        "refinement.3.ffn.project_out.weight": (96, 255, 1, 1),
        "output.weight": (3, 96, 3, 3),
    },
    "nafnet": {
        "intro.weight": (32, 3, 3, 3),
        "encoders.0.0.conv1.weight": (64, 32, 1, 1),
        "encoders.0.0.sca.1.weight": (32, 32, 1, 1),
        "encoders.0.0.beta": (1, 32, 1, 1),
        "encoders.3.7.conv5.bias": (256,),
        "downs.3.weight": (512, 256, 2, 2),
        "middle_blks.11.conv2.weight": (1024, 1, 3, 3),
        "ups.0.0.weight": (1024, 512, 1, 1),
        "decoders.3.1.norm2.bias": (32,),
        "ending.weight": (3, 32, 3, 3),
    },
    "promptir": {
        "prompt1.prompt_param": (1, 5, 64, 64, 64),
        "prompt3.prompt_param": (1, 5, 320, 16, 16),
        "prompt3.linear_layer.weight": (5, 384),
        "prompt2.conv3x3.weight": (128, 128, 3, 3),
        "noise_level3.attn.qkv.weight": (2112, 704, 1, 1),
        "reduce_noise_level3.weight": (192, 704, 1, 1),
        "noise_level1.norm1.body.weight": (160,),
        "reduce_noise_level2.weight": (192, 320, 1, 1),
        "chnl_reduce3.weight": (256, 320, 1, 1),
        "reduce_noise_channel_3.weight": (192, 448, 1, 1),
        "reduce_chan_level3.weight": (192, 288, 1, 1),
        "up4_3.body.0.weight": (384, 192, 3, 3),
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_layout(name):
    with torch.device("meta"):
        sd = build_model(name).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert key in sd, f"{name}: official key {key} missing"
        assert tuple(sd[key].shape) == shape, f"{name}: {key} {tuple(sd[key].shape)} != {shape}"


# ---------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name", ["nafnet_s", "unet_s", "restormer", "promptir"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    model = _perturb(_small(name)).eval()
    out = save_model(model, tmp_path / name, extra={"note": "test"})
    meta = json.loads((out / "model.json").read_text())
    assert meta["spec"] == model_spec(model) and meta["params"] == count_params(model) and meta["note"] == "test"
    loaded = load_model(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 35, 41)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """safetensors orders its metadata from a hash map; save_model sorts it, so a model's sha256 is stable."""
    from safetensors import safe_open

    model = _perturb(_small("nafnet_s")).eval()
    digests = {sha256_file(save_model(model, tmp_path / "m") / "model.safetensors") for _ in range(20)}
    assert len(digests) == 1
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and json.loads(f.metadata()["spec"]) == model_spec(model)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in model.state_dict().items())


def test_renamed_and_reshaped_keys_are_named(tmp_path):
    model = build_model("rescnn", width=8, blocks=1)
    sd = model.state_dict()
    sd["head.w"] = sd.pop("head.weight")  # renamed
    sd["tail.weight"] = torch.zeros(3, 4, 3, 3)  # wrong shape
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(build_model("rescnn", width=8, blocks=1), path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing from the checkpoint (1): head.weight" in msg
    assert "unexpected in the checkpoint (1): head.w" in msg
    assert "tail.weight: checkpoint (3, 4, 3, 3) vs model (3, 8, 3, 3)" in msg
    assert e.value.missing == ["head.weight"] and e.value.unexpected == ["head.w"]
    # non-strict skips renamed keys but never loads a wrong shape
    with pytest.raises(CheckpointMismatchError, match="shape conflicts"):
        load_weights(build_model("rescnn", width=8, blocks=1), path, strict=False)


def test_nafnet_in_place_inference_is_bit_identical_and_lighter(monkeypatch):
    from d4ir_pipeline.deploy.budget import activation_bytes_per_pixel
    from d4ir_pipeline.models import nafnet

    model = _perturb(build_model("nafnet", **SMALL["nafnet"])).eval()
    x = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    x_before = x.clone()
    with torch.no_grad():
        lean = model(x)
    lean_bytes = activation_bytes_per_pixel(model, size=64)
    assert torch.equal(x, x_before)  # the input is never written
    monkeypatch.setattr(nafnet, "_in_place_ok", lambda: False)
    with torch.no_grad():
        plain = model(x)
    plain_bytes = activation_bytes_per_pixel(model, size=64)
    assert torch.equal(lean, plain)
    assert lean_bytes < 0.8 * plain_bytes, (lean_bytes, plain_bytes)
    monkeypatch.undo()
    # with autograd on, the out-of-place forward runs: same output, and it backpropagates
    y = model(x)
    assert torch.equal(y.detach(), plain)
    y.mean().backward()
    assert model.intro.weight.grad is not None and bool(torch.isfinite(model.intro.weight.grad).all())


def test_mismatch_lists_are_truncated_with_counts():
    model = build_model("nafnet", **SMALL["nafnet"])
    sd = {"x." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(model, sd)
    n = len(sd)
    assert f"missing from the checkpoint ({n})" in str(e.value)
    assert f"and {n - 10} more" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_pth_with_params_and_module_prefix_loads(tmp_path):
    src = _perturb(build_model("nafnet", **SMALL["nafnet"]))
    path = tmp_path / "NAFNet-test.pth"
    torch.save({"params": {"module." + k: v for k, v in src.state_dict().items()}, "iter": 5}, path)
    dst = build_model("nafnet", **SMALL["nafnet"])
    report = load_weights(dst, path)
    assert not report["missing"] and not report["unexpected"]
    assert all(torch.equal(src.state_dict()[k], v) for k, v in dst.state_dict().items())


def test_params_ema_is_preferred_and_key_selects(tmp_path):
    a, b = _perturb(build_model("rescnn", width=4, blocks=1), 1), _perturb(build_model("rescnn", width=4, blocks=1), 2)
    path = tmp_path / "ema.pth"
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, path)
    assert torch.equal(load_state_dict_file(path)["head.weight"], b.state_dict()["head.weight"])
    assert torch.equal(load_state_dict_file(path, key="params")["head.weight"], a.state_dict()["head.weight"])


def test_lightning_checkpoint_with_net_prefix_loads(tmp_path):
    src = _perturb(build_model("promptir", **SMALL["promptir"]))
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 3, "state_dict": {"net." + k: v for k, v in src.state_dict().items()}}, path)
    dst = build_model("promptir", **SMALL["promptir"])
    load_weights(dst, path)
    assert all(torch.equal(src.state_dict()[k], v) for k, v in dst.state_dict().items())


class _Payload:
    """Unpickling this calls open(marker, 'w'): harmless, but it creates a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    # the payload really does run under a plain unpickler (so the check below means something)
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"params": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("rescnn", width=4, blocks=1), path)
    assert not marker.exists()
    assert str(path) in str(e.value) and "weights_only" in str(e.value)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "none.pth")
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_state_dict_file(bad)
    with pytest.raises(CheckpointError, match="no model.json"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------
# tiling and cost


def test_tiled_inference_matches_whole_image_for_local_model():
    """256x256, 64 px tiles, 16 px overlap: exact (float round-off) when the receptive radius <= overlap/4."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    local = build_model("d4ir_pipeline.models.students:LocalCNN", width=16, layers=4).eval()  # radius 4 px
    with torch.no_grad():
        diff = (tiled_forward(local, x, tile=64, overlap=16) - local(x)).abs()
    interior = diff[..., 16:-16, 16:-16].max().item()
    print(f"LocalCNN(radius 4) tiled vs whole: max abs diff {diff.max().item():.2e} (interior {interior:.2e})")
    assert interior < 1e-5
    # with a guard band narrower than its radius (overlap 4 -> guard 1 px) it does differ
    with torch.no_grad():
        assert (tiled_forward(local, x, tile=64, overlap=4) - local(x)).abs().max() > 1e-4


def test_tiled_inference_of_global_models_stays_close():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    for name in ("nafnet_s", "restormer_s"):
        model = _perturb(build_model(name), 4).eval()
        with torch.no_grad():
            whole, tiled = model(x), tiled_forward(model, x, tile=64, overlap=16)
        diff = (whole - tiled).abs()[..., 16:-16, 16:-16]
        print(f"{name} (global ops) tiled vs whole: max {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
        assert tiled.shape == x.shape and diff.mean() < 0.01


def test_tiling_rejects_bad_arguments():
    m = build_model("rescnn", width=4, blocks=1)
    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(m, torch.rand(1, 3, 80, 80), tile=64, overlap=64)


def test_macs_of_a_single_conv_are_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (16, 16)) == 8 * 3 * 9 * 16 * 16


def test_students_are_lighter_than_the_demo_teacher():
    with torch.device("meta"):
        teacher = build_model("demo_teacher")
        t_params, t_macs = count_params(teacher), count_macs(teacher)
        for name in STUDENTS:
            s = build_model(name)
            assert count_params(s) < t_params and count_macs(s) < t_macs, name
    assert t_params * 4 <= 8 * 1024 * 1024  # float32 weights fit the 8 MB budget


def test_models_command_reports_params_and_macs():
    res = CliRunner().invoke(models_command, ["--name", "rescnn", "--name", "nafnet_s", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["rescnn"]["params"] == count_params(build_model("rescnn"))
    assert rows["nafnet_s"]["macs"] > 0 and rows["nafnet_s"]["role"] == "student"
    table = CliRunner().invoke(models_command, ["--name", "unet_s"])
    assert re.search(r"unet_s\s+student\s+UNetS", table.output)
