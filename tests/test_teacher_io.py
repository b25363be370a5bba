"""Stage two's teacher through its I/O adapter: ranges, output index, weather flag, identity."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, model_io, save_model
from d4ir_pipeline.stage2.teacher import TeacherConfig, Teachers, load_teacher, teacher_forward, teacher_identity
from d4ir_pipeline.testing import randomised


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


def _by_weather(tmp_path) -> TeacherConfig:
    """Three tiny teachers that differ (their own random weights), one per weather, plus a default."""
    specs = {}
    for i, w in enumerate(["default", "rain", "haze", "snow"]):
        torch.manual_seed(10 + i)
        save_model(build_model("rescnn", width=4, blocks=1), tmp_path / w)
        specs[w] = TeacherConfig(checkpoint=str(tmp_path / w), dtype="float32")
    return dataclasses.replace(specs.pop("default"), by_weather=specs)


def test_each_sample_goes_to_its_weathers_teacher(tmp_path):
    cfg = _by_weather(tmp_path)
    teachers = Teachers(cfg, torch.device("cpu"))
    x = _x(12, 12).repeat(3, 1, 1, 1)[:5]  # (5, 3, 12, 12)
    weathers = ["rain", "haze", None, "snow", "fog"]  # None / unknown weathers: the default teacher
    y = teachers(x, weathers)
    for i, w in enumerate(weathers):
        spec = cfg.by_weather.get(w, cfg) if w else cfg
        single, dtype = load_teacher(dataclasses.replace(spec, by_weather={}), torch.device("cpu"))
        assert torch.allclose(y[i : i + 1], teacher_forward(single, x[i : i + 1], dtype, spec), atol=1e-6), w
    assert not torch.allclose(y[0], y[1])  # the teachers really differ
    ident = teacher_identity(cfg)
    assert set(ident["by_weather"]) == {"rain", "haze", "snow"} and ident["id"] != ident["default"]["id"]
    again = dataclasses.replace(cfg, by_weather={**cfg.by_weather, "snow": cfg.by_weather["rain"]})
    assert teacher_identity(again)["id"] != ident["id"]  # a label cache of another mapping is not reused


def test_label_cache_uses_each_weathers_teacher(tmp_path):
    from d4ir_pipeline.config import load_config
    from d4ir_pipeline.shardset.reader import read_shard
    from d4ir_pipeline.stage2.config import DistillConfig
    from d4ir_pipeline.stage2.labels import label
    from d4ir_pipeline.testing import make_shardset

    shards = make_shardset(tmp_path / "shards", n_shards=1, per=4, size=16, weathers=("rain", "haze", "snow"))
    tcfg = _by_weather(tmp_path)
    cfg = load_config(
        DistillConfig, None, [f"data.shards={str(shards)!r}", "labels.format='npy'", "log.progress=false"]
    )
    cfg = dataclasses.replace(cfg, teacher=tcfg)
    res = label(cfg)
    assert res.samples == 4 and res.skipped == 0
    import io as _io

    import numpy as np

    from d4ir_pipeline.common.images import decode_rgb

    src = read_shard(shards / "synth-r000-000000.tar")
    labels = read_shard(res.labels_dir / "synth-r000-000000.tar")
    for key, files in src.items():
        w = json.loads(files["json"])["weather"]
        spec = tcfg.by_weather[w]
        single, dtype = load_teacher(dataclasses.replace(spec, by_weather={}), torch.device("cpu"))
        arr = np.array(decode_rgb(files["degraded.png"])[0])
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
        want = teacher_forward(single, x, dtype, spec)[0].permute(1, 2, 0).numpy()
        got = np.load(_io.BytesIO(labels[key]["teacher.npy"]))
        assert np.abs(got.astype(np.float32) - want).max() < 2e-3, (key, w)  # float16 cache


def test_distill_passes_each_samples_weather_to_the_teachers(tmp_path, monkeypatch):
    import d4ir_pipeline.stage2.distill as distill_mod
    from d4ir_pipeline.config import load_config
    from d4ir_pipeline.stage2.config import DistillConfig
    from d4ir_pipeline.testing import make_shardset

    shards = make_shardset(tmp_path / "shards", n_shards=2, per=6, size=24, weathers=("rain", "haze", "snow"))
    seen: list[tuple[int, list]] = []

    class Spy(Teachers):
        def __call__(self, x, weathers=None):
            seen.append((x.shape[0], list(weathers)))
            return super().__call__(x, weathers)

    monkeypatch.setattr(distill_mod, "Teachers", Spy)
    sets = [f"data.shards={str(shards)!r}", "data.patch=16", "data.batch_size=4", "data.num_workers=0"]
    sets += ["data.holdout_fraction=0", "train.steps=3", "log.progress=false", "labels.use='off'", "val.samples=0"]
    sets += [f"output.dir={str(tmp_path / 'runs')!r}", "log.sample_keys=true"]
    cfg = dataclasses.replace(load_config(DistillConfig, None, sets), teacher=_by_weather(tmp_path))
    res = distill_mod.distill(cfg)
    assert res.steps == 3 and len(seen) == 3
    by_key = {f"k{i:03d}-{j:04d}": ("rain", "haze", "snow")[j % 3] for i in range(2) for j in range(6)}
    steps = [json.loads(line)["keys"] for line in (res.out_dir / "keys-r0.jsonl").read_text().splitlines()]
    assert [ws for _, ws in seen] == [[by_key[k] for k in keys] for keys in steps]  # each sample's own weather
    assert {w for _, ws in seen for w in ws} == {"rain", "haze", "snow"}


@pytest.mark.parametrize("name", ["dehazeformer_xs", "transweather_s", "mprnet_s", "wgws_s"])
def test_restore_runs_a_teacher_through_its_adapter_like_distillation_does(tmp_path, name):
    # restore / export load teachers through the same loader; before the adapter was applied there,
    # DehazeFormer / TransWeather got [0, 1] inputs, MPRNet's list broke the runner and WGWS-Net ran on
    # its default flag whatever the weather
    from d4ir_pipeline.deploy.runner import ModelConfig, load_runner

    model = randomised(name, 0)
    with torch.no_grad():  # WGWS-Net's weather residuals are zeros when built: make the flag matter
        for pname, p in model.named_parameters():
            if pname.endswith("_residual"):
                p.normal_(0.0, 0.1)
    save_model(model, tmp_path / name)
    cfg = TeacherConfig(checkpoint=str(tmp_path / name), dtype="float32")
    weather = "rain" if name.startswith("wgws") else ""
    runner = load_runner(ModelConfig(checkpoint=cfg.checkpoint, weather=weather), device="cpu")
    model, dtype = load_teacher(dataclasses.replace(cfg, weather=weather), torch.device("cpu"))
    x = _x(64, 64)  # TransWeather's decoder needs sides >= 64
    want = teacher_forward(model, x, dtype, dataclasses.replace(cfg, weather=weather))
    got = runner(x).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-6)
    if name != "mprnet_s":  # (MPRNet's raw call returns a list: no image to compare)
        with torch.no_grad():
            raw = model(x) if not weather else model(x, (1.0, 0.0, 0.0))  # the old call: no range, default flag
        assert (raw.clamp(0, 1) - want).abs().max() > 1e-3
    assert runner.multiple == model.multiple


def test_a_non_blind_teacher_restores_only_a_named_weather(tmp_path):
    from d4ir_pipeline.deploy.runner import ModelConfig, load_runner

    cfg = _saved(tmp_path, "wgws_s")
    with pytest.raises(D4IRError, match=r"`model.weather` \(--weather\) is empty.*snow.*rain.*haze"):
        load_runner(ModelConfig(checkpoint=cfg.checkpoint), device="cpu")
    with pytest.raises(D4IRError, match="knows"):
        load_runner(ModelConfig(checkpoint=cfg.checkpoint, weather="fog"), device="cpu")
