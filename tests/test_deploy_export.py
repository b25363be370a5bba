"""`d4ir export`: ONNX Runtime parity at any size, exact module swaps, int8 calibration, the card, atomicity."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import d4ir_pipeline
from d4ir_pipeline import testing
from d4ir_pipeline.common.io import atomic_write_json, atomic_write_text, sha256_file
from d4ir_pipeline.deploy import ExportConfig, ExportError, ModelConfig, OnnxModel, require
from d4ir_pipeline.deploy.budget import activation_bytes_per_pixel, plan, tile_for_budget
from d4ir_pipeline.deploy.card import USAGE
from d4ir_pipeline.deploy.export import CalibConfig, export, find_shardset
from d4ir_pipeline.deploy.graph import AnySize, ChannelLayerNorm, SplitGateNAFBlock, export_ready
from d4ir_pipeline.models import STUDENTS, build_model, save_model
from d4ir_pipeline.models.nafnet import LayerNorm2d, NAFBlock, layer_norm_2d
from d4ir_pipeline.testing import make_shardset

PARITY_SIZES = [(64, 64), (97, 131), (256, 192)]


def randomised(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A registered model with every parameter random, residual scales (N(0, 0.5)) and norms included."""
    return testing.randomised(name, seed, residual_std=0.5, norm_std=0.2, **kwargs)


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def exported_student(request, tmp_path_factory):
    """(model, export folder) for every registered student: fp32 ONNX only (the rest is tested once below)."""
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    model = randomised(request.param)
    save_model(model, tmp / "model")
    cfg = ExportConfig(out=str(tmp / "export"), model=ModelConfig(checkpoint=str(tmp / "model")), fp16=False,
                       int8=False, pt2=False)  # fmt: skip
    export(cfg)
    return model, tmp / "export"


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_at_any_size_for_every_student(exported_student):
    model, out = exported_student
    sess = OnnxModel(out / "model.onnx")
    assert not sess.session.get_session_options().enable_mem_pattern  # one block per shape would double the peak
    sizes = [*PARITY_SIZES, (1, 1), (5, 7), (9, 300)]  # odd and tiny sides: the pad is in the graph
    g = torch.Generator().manual_seed(3)
    for b, (h, w) in [(1, s) for s in sizes] + [(2, (97, 131))]:
        x = torch.rand(b, 3, h, w, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(x.numpy())
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= 1e-4, (b, h, w)
    onnx = require("onnx")
    graph = onnx.load(str(out / "model.onnx"))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # dynamic batch, height, width
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # no layout round trips: a Transpose (e.g. around a LayerNormalization) takes ONNX Runtime out of NCHWc
    assert not {n.op_type for n in graph.graph.node} & {"Transpose", "LayerNormalization"}
    # the channel LayerNorm's means are 1x1 convs: a ReduceMean here pools space (SCA), never channels
    for node in (n for n in graph.graph.node if n.op_type == "ReduceMean"):
        axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
        if not axes:  # opset 18: the axes are an input, a graph constant
            const = {i.name: i for i in graph.graph.initializer}
            src = {o: n for n in graph.graph.node for o in n.output}
            name = node.input[1]
            tensor = const[name] if name in const else next(a.t for a in src[name].attribute if a.name == "value")
            axes = [onnx.numpy_helper.to_array(tensor).tolist()]
        assert 1 not in axes[0] and -3 not in axes[0], axes
    info = json.loads((out / "export.json").read_text())
    assert [r["size"] for r in info["verification"]["fp32_onnxruntime"]] == ["64x64", "97x131", "256x192", "64x64"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in info["verification"]["fp32_onnxruntime"])


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_in_graph_padding_equals_the_models_own_padding_at_every_size(name):
    model = randomised(name)
    wrapped = AnySize(model, getattr(model, "multiple", 1)).eval()
    g = torch.Generator().manual_seed(0)
    for h, w in [(1, 1), (3, 5), (7, 7), (8, 9), (17, 23), (97, 131)]:
        x = torch.rand(2, 3, h, w, generator=g)
        with torch.no_grad():
            assert torch.equal(wrapped(x), model(x)), (name, h, w)  # same arithmetic, so bit-exact


class _LayerNormFunction(torch.autograd.Function):
    """Channel LayerNorm written as a custom autograd.Function, the way the official NAFNet code does."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mu = x.mean(1, keepdim=True)
        y = (x - mu) / ((x - mu).pow(2).mean(1, keepdim=True) + eps).sqrt()
        return weight.view(1, -1, 1, 1) * y + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - inference only
        raise NotImplementedError


class LayerNorm2dOfficialStyle(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))
        self.bias = nn.Parameter(torch.randn(c))
        self.eps = eps

    def forward(self, x):
        return _LayerNormFunction.apply(x, self.weight, self.bias, self.eps)


LayerNorm2dOfficialStyle.__name__ = "LayerNorm2d"  # matched by class name, as the official module would be


def test_layernorm2d_is_replaced_by_an_exact_equivalent():
    torch.manual_seed(0)
    ours = LayerNorm2d(16)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    x = torch.randn(2, 16, 13, 9) * 7.0 + 3.0  # a large mean: where a naive variance loses digits
    for original in (ours, LayerNorm2dOfficialStyle(16)):
        net = nn.Sequential(nn.Identity(), original)
        ready, counts = export_ready(net)
        assert counts == {"LayerNorm2d": 1} and isinstance(ready[1], ChannelLayerNorm)
        with torch.no_grad():
            diff = (ready(x) - net(x)).abs().max().item()
        assert diff <= 1e-5, diff
        assert torch.allclose(ready(x), layer_norm_2d(x, original.weight, original.bias, 1e-6), rtol=0, atol=1e-5)
        # the channel means are 1x1 convs: nothing reduces over axis 1, eps sits in the variance conv's bias
        norm = ready[1]
        assert norm.centre.shape == (16, 16, 1, 1) and norm.mean.shape == (1, 16, 1, 1)
        assert torch.allclose(F.conv2d(x, norm.mean).squeeze(1), x.mean(1), atol=1e-6)
        assert norm.eps_bias.tolist() == [pytest.approx(1e-6)] and not norm.state_dict().keys() - {"weight", "bias"}
    assert isinstance(net[1], LayerNorm2dOfficialStyle)  # the original model is left untouched
    model = randomised("nafnet_s")
    ready, counts = export_ready(model)
    assert counts == {"NAFBlock": 7, "LayerNorm2d": 14}  # the blocks' norms are swapped inside the new blocks
    assert not any(isinstance(m, (NAFBlock, LayerNorm2d)) for m in ready.modules())
    x = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        assert (ready(x) - model(x)).abs().max().item() <= 1e-5


def test_nafblock_gates_read_half_width_convs_and_other_layouts_are_left_alone():
    torch.manual_seed(0)
    block = NAFBlock(8)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    ready, counts = export_ready(nn.Sequential(block))
    assert counts == {"NAFBlock": 1, "LayerNorm2d": 2} and isinstance(ready[0], SplitGateNAFBlock)
    assert (ready[0].conv1a.out_channels, ready[0].conv2a.groups, ready[0].conv4b.out_channels) == (8, 8, 8)
    # the norms' scale and shift live in the half-width 1x1 convs that read them; the original keeps its own
    norm1 = ready[0].norm1
    assert isinstance(norm1, ChannelLayerNorm) and norm1.weight is None and ready[0].norm2.weight is None
    g, b = block.norm1.weight.detach(), block.norm1.bias.detach()
    w1 = block.conv1.weight.detach()[:8]
    assert torch.allclose(ready[0].conv1a.weight, w1 * g.view(1, -1, 1, 1), atol=1e-6)
    assert torch.allclose(ready[0].conv1a.bias, block.conv1.bias.detach()[:8] + w1[:, :, 0, 0] @ b, atol=1e-6)
    x = torch.randn(2, 8, 11, 13) * 4.0 + 2.0
    with torch.no_grad():
        assert (ready(x) - block(x)).abs().max().item() <= 1e-5
    strided = NAFBlock(8)
    strided.conv2.stride = (2, 2)  # not the gate layout the swap knows: left as it is (its norms still swap)
    ready, counts = export_ready(nn.Sequential(strided))
    assert counts == {"LayerNorm2d": 2} and isinstance(ready[0], NAFBlock)


def _fake_distill_run(work: Path, name: str = "nafnet_s") -> tuple[Path, Path]:
    """A shard set and a student folder laid out as `d4ir distill` writes them (run.json, model.json `run`)."""
    shards = make_shardset(work / "shards", n_shards=3, per=6, size=48, smooth=6, noise=6.0)
    sha = sha256_file(shards / "shardset.json")
    run_dir = work / "distill" / name
    teacher = {"id": "t" * 16, "path": "teacher/", "weights_sha256": "a" * 64, "spec": {"name": "demo_teacher"}}
    atomic_write_json(run_dir / "run.json", {"shardset": str(shards), "shardset_sha256": sha, "teacher": teacher})
    extra = {"run": {"shardset_sha256": sha, "teacher": teacher, "targets": "teacher", "config_hash": "c" * 64},
             "steps": 12, "val_psnr_vs_teacher": 31.25}  # fmt: skip
    save_model(randomised(name), run_dir / "student", extra=extra)
    eval_dir = work / "eval" / name
    atomic_write_text(
        eval_dir / "summary.md", "# Evaluation: teacher vs student\n\n| set | PSNR |\n|---|---|\n| rain | 27.5 |\n"
    )
    atomic_write_json(eval_dir / "summary.json", {"student": {"checkpoint": str(run_dir / "student")}})
    return run_dir / "student", shards


@pytest.mark.slow
def test_full_export_is_verified_calibrated_on_the_students_shards_and_documented(tmp_path, monkeypatch):
    student, shards = _fake_distill_run(tmp_path)
    out = tmp_path / "export"
    cfg = ExportConfig(out=str(out), model=ModelConfig(checkpoint=str(student)),
                       calib=CalibConfig(samples=8, eval_samples=4, size=48))  # fmt: skip
    r = export(cfg)
    names = {p.name for p in out.iterdir()}
    assert names == {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.pt2", "export.json", "README.md"}
    assert not list(tmp_path.glob(".export*")), "the tmp folder must be renamed away"
    info = json.loads((out / "export.json").read_text())
    int8 = info["verification"]["int8"]
    assert int8["method"].startswith("static QDQ") and int8["calibration_samples"] == 8
    assert "distillation's shard set" in int8["calibration"]
    assert math.isfinite(r.int8_psnr_db) and r.int8_psnr_db == int8["psnr_db_mean"]
    assert r.max_abs_diff <= 1e-4 and r.pt2_max_abs_diff <= 1e-4 and r.fp16_psnr_db >= 40.0
    for name, f in info["files"].items():
        assert sha256_file(out / name) == f["sha256"] and (out / name).stat().st_size == f["bytes"]
    package_dir = str(Path(d4ir_pipeline.__file__).resolve().parent).encode()
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):  # the exporter's stack traces are dropped
        assert package_dir not in (out / name).read_bytes(), f"{name} names where it was exported"

    card = (out / "README.md").read_text()
    assert info["model"]["adapter"] is None and "I/O adapter" not in card  # a student is called plainly
    sha = sha256_file(shards / "shardset.json")
    for text in (
        sha,
        "t" * 16,
        "a" * 64,
        "| rain | 27.5 |",
        "31.25",
        f"{r.int8_psnr_db:.2f} dB",
        "97x131",
        "NAFBlock x 7 -> gates over half-width convs",
        "LayerNorm2d x 14 -> channel means as 1x1 convs",
    ):
        assert text in card, text
    for f in info["files"].values():
        assert f["sha256"] in card
    assert card.count("\n", card.index("```python"), card.index("```\n", card.index("```python"))) == 6

    # the card's five-line snippet works as printed, on an odd-sized photo
    monkeypatch.chdir(out)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save("in.jpg")
    exec(compile(USAGE, "card-usage", "exec"), {})  # noqa: S102
    assert Image.open("out.png").size == (61, 45)

    # int8 and the ExportedProgram run at an odd size too
    x = torch.rand(1, 3, 97, 131)
    q = OnnxModel(out / "model.int8.onnx").run(x.numpy())
    assert q.shape == (1, 3, 97, 131) and np.isfinite(q).all()
    pt2 = torch.export.load(str(out / "model.pt2")).module()
    model = randomised("nafnet_s")
    with torch.no_grad():
        assert (pt2(x) - model(x)).abs().max().item() <= 1e-4


def test_the_same_weights_export_to_the_same_files(tmp_path):
    """Two exports of one model: the same bytes in every file (the card's hashes), timings aside.

    model.pt2 stores the example torch.export traced with; an unseeded one gave each
    export another model.pt2 (and another sha256 on the card).
    """
    save_model(randomised("rescnn", width=8, blocks=1), tmp_path / "m")
    infos = []
    for out in ("a", "b"):
        export(ExportConfig(out=str(tmp_path / out), model=ModelConfig(checkpoint=str(tmp_path / "m")), int8=False))
        infos.append(json.loads((tmp_path / out / "export.json").read_text()))
    assert set(infos[0]["files"]) == {"model.onnx", "model.fp16.onnx", "model.pt2"}
    assert infos[0]["files"] == infos[1]["files"]
    assert (tmp_path / "a" / "README.md").read_bytes() == (tmp_path / "b" / "README.md").read_bytes()
    for info in infos:
        info.pop("seconds")
    assert infos[0] == infos[1]
    # and no file names the machine it was made on (this install's source paths were in model.pt2's stack
    # traces: the same model exported from two installs gave two files)
    source = str(Path(d4ir_pipeline.__file__).resolve().parent.parent).encode()
    for name in infos[0]["files"]:
        with zipfile.ZipFile(tmp_path / "a" / name) if name.endswith(".pt2") else contextlib.nullcontext() as z:
            blobs = [z.read(i) for i in z.infolist()] if z else [(tmp_path / "a" / name).read_bytes()]
        assert not any(source in b for b in blobs), name


def test_calibration_set_is_the_students_own_or_the_reason_is_given(tmp_path):
    student, shards = _fake_distill_run(tmp_path)
    meta = json.loads((student / "model.json").read_text())
    path, how = find_shardset(CalibConfig(), meta, student)
    assert path == shards and "matches model.json" in how
    path, how = find_shardset(CalibConfig(), {}, None)
    assert path is None and "no run.shardset_sha256" in how
    other = make_shardset(tmp_path / "other", n_shards=1, per=2, size=16, seed=5)
    path, how = find_shardset(CalibConfig(shards=str(other)), meta, student)
    assert path == other and "NOT the set this model was distilled on" in how
    doc = json.loads((shards / "shardset.json").read_text())
    doc["config_hash"] = "edited"
    (shards / "shardset.json").write_text(json.dumps(doc))
    path, how = find_shardset(CalibConfig(), meta, student)
    assert path is None and "changed since distillation" in how


def test_int8_without_a_shard_set_falls_back_to_dynamic_and_says_why(tmp_path):
    save_model(randomised("rescnn", width=8, blocks=1), tmp_path / "m")
    cfg = ExportConfig(out=str(tmp_path / "out"), model=ModelConfig(checkpoint=str(tmp_path / "m")), pt2=False,
                       fp16=False, calib=CalibConfig(eval_samples=2, size=32))  # fmt: skip
    r = export(cfg)
    int8 = r.info["verification"]["int8"]
    assert r.int8_method.startswith("dynamic") and "no run.shardset_sha256" in int8["static_not_used_because"]
    assert math.isfinite(r.int8_psnr_db) and "scikit-image" in int8["psnr_images"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Static quantisation was not used" in card and f"{r.int8_psnr_db:.2f} dB" in card


def test_a_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    from d4ir_pipeline.deploy import export as ex

    save_model(randomised("rescnn", width=8, blocks=1), tmp_path / "m")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while quantising")

    monkeypatch.setattr(ex, "quantize_int8", boom)
    cfg = ExportConfig(
        out=str(tmp_path / "out"), model=ModelConfig(checkpoint=str(tmp_path / "m")), fp16=False, pt2=False
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        export(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # neither out/ nor .out.tmp/


def test_export_refuses_bad_arguments_before_any_work(tmp_path):
    save_model(build_model("rescnn", width=4, blocks=1), tmp_path / "m")
    model = ModelConfig(checkpoint=str(tmp_path / "m"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export(ExportConfig(out=str(tmp_path / "taken"), model=model))
    with pytest.raises(ExportError, match="one with an odd side"):
        export(ExportConfig(out=str(tmp_path / "o"), model=model, verify_sizes=("64x64", "32x32", "16x16")))
    with pytest.raises(ExportError, match="expected HxW"):
        export(ExportConfig(out=str(tmp_path / "o"), model=model, verify_sizes=("64", "97x131", "3x3")))
    with pytest.raises(Exception, match="already an ONNX file"):
        export(ExportConfig(out=str(tmp_path / "o"), model=ModelConfig(checkpoint=str(tmp_path / "x.onnx"))))
    assert not (tmp_path / "o").exists()


def test_missing_onnxruntime_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"pip install 'd4ir-pipeline\[export\]'"):
        require("onnxruntime")
    with pytest.raises(ImportError, match=r"d4ir-pipeline\[export\]"):
        export(ExportConfig(out=str(tmp_path / "o"), model=ModelConfig(checkpoint="reference")))
    with pytest.raises(ImportError, match=r"d4ir-pipeline\[export\]"):
        OnnxModel(tmp_path / "m.onnx")


def test_activation_bytes_per_pixel_is_measured_and_drives_the_tile_plan():
    small, heavy = build_model("nafnet_s"), build_model("restormer_s")
    b64, b128 = activation_bytes_per_pixel(small, size=64), activation_bytes_per_pixel(small, size=128)
    assert b64 > 0 and b128 == pytest.approx(b64, rel=0.05)  # linear in the pixel count
    assert activation_bytes_per_pixel(build_model("nafnet_s", width=32), size=64) > 1.5 * b64
    assert activation_bytes_per_pixel(heavy, size=64) > 0
    budget = 64 * 2**20
    side = tile_for_budget(b128, budget, multiple=8)
    assert side % 8 == 0 and side * side * b128 <= budget < (side + 16) ** 2 * b128
    assert plan(4000, 3000, bytes_per_pixel=b128, budget_bytes=budget, max_batch=8).tile == side
    small_plan = plan(64, 64, bytes_per_pixel=b128, budget_bytes=budget, max_batch=8)
    assert small_plan.tile == 0 and small_plan.batch == 8
    assert plan(300, 300, bytes_per_pixel=b128, budget_bytes=budget, max_batch=8).batch < 8
    assert plan(300, 300, bytes_per_pixel=b128, budget_bytes=budget, max_batch=8, tile=128).tile == 128


def test_measuring_activation_bytes_leaves_a_model_with_a_shared_module_intact():
    # MPRNet uses one PReLU at many places: torch.func.functional_call left its other uses on `meta`,
    # so the restore that measured the model next crashed ("not on the expected device meta")
    model = randomised("mprnet_s")
    x = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)[0]
    assert activation_bytes_per_pixel(model, size=64) > 0
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


@pytest.mark.slow
def test_demo_step_exports_the_student_and_restores_the_test_inputs_with_it(tmp_path):
    from d4ir_pipeline.data.manifests import ImageRecord, write_manifest
    from d4ir_pipeline.deploy.demo import demo_step

    student, _ = _fake_distill_run(tmp_path / "work")
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    recs = []
    for i in range(3):
        p = root / "test" / f"t{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (45, 53, 3), dtype=np.uint8)).save(p)
        recs.append(ImageRecord(id=f"t{i}", path=f"test/t{i}.png", url=None, sha256=sha256_file(p), width=53,
                                height=45, weather="rain", split="test"))  # fmt: skip
    manifest = write_manifest(tmp_path / "test-rain.jsonl", recs)
    out = tmp_path / "work" / "deploy"
    res = demo_step(student, [str(manifest)], out, root)
    assert res["max_abs_diff"] <= 1e-4 and all(v > 0 for v in res["latency_ms"].values())
    assert res["restored"]["test-rain"] == {"restored": 3, "skipped": 0, "out": str(out / "restored" / "test-rain")}
    assert all((out / "restored" / "test-rain" / "test" / f"t{i}.png").is_file() for i in range(3))
    assert any("ONNX Runtime vs PyTorch" in line for line in res["lines"])
    stamp = (out / "export" / "export.json").stat().st_mtime_ns
    demo_step(student, [str(manifest)], out, root)  # a rerun reuses the export of the same student
    assert (out / "export" / "export.json").stat().st_mtime_ns == stamp


def test_demo_paths_follow_the_demo_configs(tmp_path):
    from d4ir_pipeline.deploy.demo import demo_paths

    student, manifests, out, root = demo_paths(tmp_path / "w", student="unet_s")
    assert student == tmp_path / "w" / "distill" / "unet_s" / "student"
    assert sorted(Path(m).name for m in manifests) == ["test-haze.jsonl", "test-rain.jsonl", "test-snow.jsonl"]
    assert out == tmp_path / "w" / "deploy" and root == tmp_path / "w" / "data"
