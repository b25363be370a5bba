"""Paths only a CUDA machine or real weights exercise: skipped here unless the hardware / files exist.

`cuda` tests run when torch sees a CUDA device (fp16 synthesis with SDPA or xformers, AMP
distillation); `real_weights` tests run with D4IR_REAL_WEIGHTS=1 and the model paths in
D4IR_SD_MODEL (a diffusers SD folder or hub id in the cache) and D4IR_TEACHER_CKPT +
D4IR_TEACHER_ARCH (a released teacher checkpoint and its registry name).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from d4ir_pipeline.config import load_config
from d4ir_pipeline.stage2.config import DistillConfig
from d4ir_pipeline.stage2.distill import distill
from d4ir_pipeline.testing import make_shardset

TEACHER = "d4ir_pipeline.models.students:LocalCNN"


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_distill_on_cuda_with_amp_and_a_half_precision_teacher(tmp_path, amp):
    from d4ir_pipeline.models import build_model, save_model

    save_model(build_model(TEACHER, width=8, layers=2), tmp_path / "teacher")
    shards = make_shardset(tmp_path / "shards", n_shards=2, per=8, size=48)
    sets = [
        f"data.shards={str(shards)!r}",
        f"teacher.checkpoint={str(tmp_path / 'teacher')!r}",
        "teacher.dtype='float16'",
    ]
    sets += ["data.patch=32", "data.batch_size=4", "data.num_workers=1", "train.steps=6", "runtime.device='cuda'"]
    sets += [f"train.amp={amp!r}", "log.progress=false", f"output.dir={str(tmp_path / 'runs')!r}", "val.samples=2"]
    res = distill(load_config(DistillConfig, None, sets))
    assert res.steps == 6 and res.final_loss is not None and torch.isfinite(torch.tensor(res.final_loss))
    assert res.val_psnr is None or res.val_psnr > 0


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_synthesis_on_cuda_in_float16(tmp_path, tiny_sd_path, attention):
    if attention == "xformers":
        pytest.importorskip("xformers")
    from d4ir_pipeline.data.manifests import build_manifest
    from d4ir_pipeline.demo.data import build_demo_data
    from d4ir_pipeline.stage1.synthesize import SynthesizeConfig, synthesize
    from d4ir_pipeline.testing import write_bank

    root = tmp_path / "data"
    build_demo_data(root, seed=0)
    bank = write_bank(tmp_path / "bank")
    sets = {
        "sd.model": str(tiny_sd_path), "data.manifest": str(root / "manifests" / "web-clean.jsonl"),
        "data.root": str(root), "data.resolution": 32, "data.min_side": 32, "data.limit": 4,
        "bank.dir": str(bank), "output.dir": str(tmp_path / "shards"), "ccd.steps": 4,
        "runtime.device": "cuda", "runtime.dtype": "float16", "runtime.attention": attention,
    }  # fmt: skip
    res = synthesize(load_config(SynthesizeConfig, None, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))
    assert res.complete and res.samples_written == 4
    doc = json.loads((tmp_path / "shards" / "shardset.json").read_text())
    assert doc["runtime"]["device"].startswith("cuda") and doc["runtime"]["dtype"] == "float16"
    del build_manifest  # imported to fail early if the data layer cannot load


@pytest.mark.real_weights
def test_real_sd_folder_loads_with_its_published_widths():
    from d4ir_pipeline.stage1.sd import check_sd_source, load_img2img_pipeline, text_hidden_size

    src = os.environ.get("D4IR_SD_MODEL")
    if not src:
        pytest.skip("set D4IR_SD_MODEL to a Stable Diffusion folder or cached hub id")
    check_sd_source(src)
    assert text_hidden_size(src) in (768, 1024)  # SD 1.x / SD 2.x
    pipe = load_img2img_pipeline(src, device=torch.device("cpu"), dtype=torch.float32, attention="sdpa")
    assert pipe.unet.config.cross_attention_dim == text_hidden_size(src)


@pytest.mark.real_weights
def test_real_teacher_checkpoint_loads_strictly_and_restores_in_range():
    from d4ir_pipeline.stage2.teacher import TeacherConfig, load_teacher, teacher_forward

    ckpt, arch = os.environ.get("D4IR_TEACHER_CKPT"), os.environ.get("D4IR_TEACHER_ARCH")
    if not (ckpt and arch):
        pytest.skip("set D4IR_TEACHER_CKPT and D4IR_TEACHER_ARCH to a released checkpoint and its registry name")
    cfg = TeacherConfig(checkpoint=ckpt, arch=arch, dtype="float32", weather=os.environ.get("D4IR_TEACHER_WEATHER", ""))
    model, dtype = load_teacher(cfg, torch.device("cpu"))
    x = torch.rand(1, 3, 67, 91)
    y = teacher_forward(model, x, dtype, cfg)
    assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
