"""Stage configs: typed loading, overrides, and errors that name file, key and value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from d4ir_pipeline.config import (
    PATHS,
    RENAMED,
    ConfigError,
    config_diff,
    config_hash,
    load_config,
    load_stage_config,
    neutral_keys,
    opt,
    parse_override,
    redefault,
)


@dataclass(frozen=True)
class Train:
    steps: int = opt(10, help="few steps", min=1)
    lr: float = opt(1e-3, help="AdamW default", min=0.0)
    loss: str = opt("l1", help="pixel loss", choices=("l1", "charbonnier"))
    out: str = opt("{work}/out", help="output folder")
    crop: tuple[int, int] = opt((64, 64), help="patch")
    mix: dict[str, float] = opt(default_factory=lambda: {"rain": 1.0}, help="weights", min=0.0)
    resume: str | None = opt(None, help="optional path")


@dataclass(frozen=True)
class Cfg:
    seed: int = opt(0, help="seed")
    train: Train = opt(default_factory=Train, help="training")


def write(tmp_path, text):
    p = tmp_path / "demo" / "x.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_types_and_substitution(tmp_path):
    p = write(tmp_path, "seed = 3\n[train]\nsteps = 5\nlr = 1\ncrop = [32, 48]\n")
    cfg = load_config(Cfg, p, work_dir="W")
    assert cfg.seed == 3 and cfg.train.steps == 5
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.crop == (32, 48)
    assert cfg.train.out == "W/out"
    # profile comes from the folder name and sets the default work dir
    assert load_config(Cfg, p).train.out == "runs/demo/out"


def test_misspelt_key_fails_with_did_you_mean(tmp_path):
    p = write(tmp_path, "[train]\nsteSp = 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    msg = str(e.value)
    assert str(p) in msg and "steSp" in msg and "train.steps" in msg


def test_wrong_type_and_range_and_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps.*'ten'.*expected int"):
        load_config(Cfg, write(tmp_path, '[train]\nsteps = "ten"\n'))
    with pytest.raises(ConfigError, match=r"train\.steps.*must be >= 1"):
        load_config(Cfg, write(tmp_path, "[train]\nsteps = 0\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'charbonnier'"):
        load_config(Cfg, write(tmp_path, '[train]\nloss = "charbonier"\n'))
    with pytest.raises(ConfigError, match=r"train\.mix.*must be >= 0"):
        load_config(Cfg, write(tmp_path, "[train.mix]\nrain = -1\n"))
    with pytest.raises(ConfigError, match="expected bool|expected int"):
        load_config(Cfg, write(tmp_path, "seed = true\n"))


def test_overrides(tmp_path):
    p = write(tmp_path, "")
    cfg = load_config(Cfg, p, ["train.steps=7", "train.loss=charbonnier", "train.resume=/x", "train.mix={haze=2}"])
    assert cfg.train.steps == 7 and cfg.train.loss == "charbonnier" and cfg.train.resume == "/x"
    assert cfg.train.mix == {"haze": 2.0}
    with pytest.raises(ConfigError, match="train.stesp.*Did you mean `train.steps`"):
        load_config(Cfg, p, ["train.stesp=7"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.steps")


def test_config_hash_is_stable_and_sensitive(tmp_path):
    p = write(tmp_path, "")
    a, b = load_config(Cfg, p), load_config(Cfg, p)
    assert config_hash(a) == config_hash(b)
    c = load_config(Cfg, p, ["train.steps=2"])
    assert config_hash(a) != config_hash(c)
    assert config_hash(a, exclude=["train.steps"]) == config_hash(c, exclude=["train.steps"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.toml")


def test_redefault_keeps_help_and_range_of_the_base_section(tmp_path):
    @dataclass(frozen=True)
    class Small(Train):
        steps: int = redefault(Train, "steps", 3)
        loss: str = redefault(Train, "loss", "charbonnier", help="pixel loss, smooth")

    fields = {f.name: f for f in dataclasses.fields(Small)}
    assert Small().steps == 3 and Small().loss == "charbonnier" and Small().lr == 1e-3
    assert fields["steps"].metadata["help"] == "few steps" and fields["loss"].metadata["help"] == "pixel loss, smooth"
    with pytest.raises(ConfigError, match=r"`steps` = 0: must be >= 1"):
        load_config(Small, write(tmp_path, "steps = 0\n"))
    with pytest.raises(ConfigError, match="allowed values"):
        load_config(Small, write(tmp_path, "loss = 'l2'\n"))


@dataclass(frozen=True)
class Run:
    steps: int = opt(10, help="steps", min=1)
    every: int = opt(5, help="log cadence", affects_output=False)
    bank: str = opt("{bank}/tokens", help="bank folder")


@dataclass(frozen=True)
class StageCfg:
    train: Run = opt(default_factory=Run, help="training")
    seed: int = opt(0, help="seed")


def test_affects_output_false_keys_are_left_out_of_the_hash(tmp_path):
    p = write(tmp_path, "")
    a = load_config(StageCfg, p)
    assert neutral_keys(StageCfg) == ("train.every",)
    assert config_hash(a) == config_hash(load_config(StageCfg, p, ["train.every=99"]))
    assert config_hash(a) != config_hash(load_config(StageCfg, p, ["train.steps=99"]))
    assert config_diff({"train": {"steps": 1, "every": 2}}, {"train": {"steps": 3, "every": 2}}) == [
        "train.steps: 1 -> 3"
    ]
    assert config_diff({"a": 1}, {"a": 2}, ignore=["a"]) == []


def _profile(root, name, files: dict[str, str]):
    d = root / name
    d.mkdir(parents=True)
    for fname, text in files.items():
        (d / fname).write_text(text)


def test_profile_inherits_from_its_base_and_holds_only_what_differs(tmp_path, monkeypatch):
    root = tmp_path / "stages"
    _profile(root, "big", {"x.toml": "seed = 7\n[train]\nsteps = 100\n", "profile.toml": '[paths]\nbank = "/b"\n'})
    _profile(root, "small", {"x.toml": "[train]\nsteps = 2\n", "profile.toml": 'base = "big"\n'})
    _profile(root, "empty", {"profile.toml": 'base = "small"\n'})
    monkeypatch.setenv("D4IR_STAGES", str(root))
    cfg = load_stage_config(StageCfg, "x", profile="small", work_dir="W")
    assert cfg.seed == 7 and cfg.train.steps == 2  # seed from the base, steps from the profile
    assert cfg.train.bank == "/b/tokens"  # the base's [paths] reach the placeholder
    assert load_stage_config(StageCfg, "x", profile="empty").train.steps == 2  # two levels up
    assert load_stage_config(StageCfg, "y", profile="small") == StageCfg(
        train=Run(bank="/b/tokens")
    )  # no file: defaults
    # an error in a base file names that file
    (root / "big" / "x.toml").write_text("[train]\nsteps = 0\n")
    with pytest.raises(ConfigError, match=r"^--set train\.steps=0: `train\.steps` = 0: must be >= 1"):
        load_stage_config(StageCfg, "x", profile="empty", overrides=["train.steps=0"])  # the override set it
    with pytest.raises(ConfigError, match=r"big.x\.toml.*`train\.steps` = 0"):
        load_stage_config(StageCfg, "x", profile="big")
    _profile(root, "loop", {"profile.toml": 'base = "loop"\n'})
    with pytest.raises(ConfigError, match="cycle"):
        load_stage_config(StageCfg, "x", profile="loop")
    _profile(root, "typo", {"profile.toml": '[paths]\nbnak = "/x"\n'})
    with pytest.raises(ConfigError, match=r"paths\.bnak.*Did you mean `paths\.bank`"):
        load_stage_config(StageCfg, "x", profile="typo")
    with pytest.raises(ConfigError, match=r"profile 'nope'.*profiles: \['big', 'empty', 'loop', 'small', 'typo'\]"):
        load_stage_config(StageCfg, "x", profile="nope")


def test_default_paths_are_work_subfolders(tmp_path):
    cfg = load_config(StageCfg, write(tmp_path, ""), work_dir="W")
    assert cfg.train.bank == "W/bank/tokens" and PATHS["bank"] == "{work}/bank"


def test_a_renamed_key_names_its_new_name(tmp_path, monkeypatch):
    monkeypatch.setitem(RENAMED, "train.log_every", "train.every")
    with pytest.raises(ConfigError, match=r"`train\.log_every` was renamed; did you mean `train\.every`"):
        load_config(StageCfg, write(tmp_path, "[train]\nlog_every = 3\n"))
    with pytest.raises(ConfigError, match=r"`train\.log_every` was renamed"):
        load_config(StageCfg, write(tmp_path, ""), ["train.log_every=3"])


@dataclass(frozen=True)
class Spec:
    checkpoint: str = opt("", help="weights")
    tile: int = opt(0, help="tile", min=0)


@dataclass(frozen=True)
class WithTable:
    by_weather: dict[str, Spec] = opt(default_factory=dict, help="one spec per weather")


def test_a_table_of_named_sections_is_typed_merged_and_overridable(tmp_path):
    p = write(tmp_path, '[by_weather]\nrain = {checkpoint = "/r.pth"}\nhaze = {checkpoint = "/h.pth", tile = 256}\n')
    cfg = load_config(WithTable, p, ["by_weather.rain.tile=128", "by_weather.snow.checkpoint=/s.pth"])
    assert cfg.by_weather == {
        "rain": Spec("/r.pth", 128),
        "haze": Spec("/h.pth", 256),
        "snow": Spec("/s.pth", 0),
    }
    with pytest.raises(ConfigError, match=r"by_weather\.haze\.tile.*must be >= 0"):
        load_config(WithTable, p, ["by_weather.haze.tile=-1"])
    with pytest.raises(ConfigError, match=r"by_weather\.rain\.tiel.*Did you mean `by_weather\.rain\.tile`"):
        load_config(WithTable, write(tmp_path, "[by_weather.rain]\ntiel = 1\n"))
    assert load_config(WithTable, None) == WithTable()


def test_an_override_is_checked_like_the_same_key_in_a_file(tmp_path):
    """`--set` of a key inside a table entry, of an entry or of a section given whole: the file's checks
    and messages (it named `tiel` without its table, let `train={stesp=7}` through silently, and
    crashed on `by_weather=3`)."""
    p = write(tmp_path, '[by_weather]\nrain = {checkpoint = "/r.pth"}\n')
    with pytest.raises(ConfigError, match=r"--set by_weather.rain.tiel=1: unknown key `by_weather\.rain\.tiel`\. Did"):
        load_config(WithTable, p, ["by_weather.rain.tiel=1"])
    with pytest.raises(ConfigError, match=r"--set by_weather=3: `by_weather` = 3: expected a table"):
        load_config(WithTable, p, ["by_weather=3"])
    with pytest.raises(ConfigError, match=r"`by_weather\.haze` = 3: expected a table"):
        load_config(WithTable, p, ["by_weather.haze=3"])
    with pytest.raises(ConfigError, match=r"unknown key `by_weather\.haze\.bogus`"):
        load_config(WithTable, p, ["by_weather.haze={bogus = 1}"])
    cfg = load_config(WithTable, p, ["by_weather.haze={tile = 8}"])
    assert cfg.by_weather == {"rain": Spec("/r.pth", 0), "haze": Spec("", 8)}
    p = write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"--set train=3: `train` = 3: expected a table \[train\]"):
        load_config(Cfg, p, ["train=3"])
    with pytest.raises(ConfigError, match=r"unknown key `train\.stesp`\. Did you mean `train\.steps`"):
        load_config(Cfg, p, ["train={stesp = 7}"])
    assert load_config(Cfg, p, ["train={steps = 7}"]).train.steps == 7


def test_an_explicit_file_may_name_a_profile_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("D4IR_STAGES", str(tmp_path / "stages"))
    p = write(tmp_path, "seed = 4\n")
    cfg = load_stage_config(StageCfg, "x", profile="adhoc", config=p, work_dir="W")
    assert cfg.seed == 4 and cfg.train.bank == "W/bank/tokens"
    with pytest.raises(ConfigError, match="profile 'adhoc'"):
        load_stage_config(StageCfg, "x", profile="adhoc")  # without a file the profile must exist


def test_a_plain_table_value_is_replaced_by_the_profile_not_merged(tmp_path, monkeypatch):
    root = tmp_path / "stages"
    _profile(root, "big", {"m.toml": "[train]\nmix = {rain = 1, haze = 2}\nsteps = 7\n"})
    _profile(root, "small", {"m.toml": "[train]\nmix = {snow = 3}\n", "profile.toml": 'base = "big"\n'})
    monkeypatch.setenv("D4IR_STAGES", str(root))
    assert load_stage_config(Cfg, "m", profile="big").train.mix == {"rain": 1.0, "haze": 2.0}
    small = load_stage_config(Cfg, "m", profile="small").train
    assert small.mix == {"snow": 3.0}  # replaced whole, not merged with the base's weights
    assert small.steps == 7  # while the section itself still merges key by key


@pytest.mark.parametrize(
    ("stage", "old", "new"),
    [
        ("distill", "out='x'", "output.dir"),
        ("distill", "train.device='cpu'", "runtime.device"),
        ("evaluate", "device='cpu'", "runtime.device"),
        ("prompt-bank", "bank.out='x'", "output.dir"),
        ("train-dpa", "train.device='cpu'", "runtime.device"),
        ("teacher", "out.dir='x'", "output.dir"),
    ],
)
def test_every_stage_names_its_output_folder_and_device_alike(stage, old, new):
    import importlib

    from d4ir_pipeline.configdoc import STAGES

    module, name = STAGES["dpa" if stage == "train-dpa" else stage]
    cls = getattr(importlib.import_module(module), name)
    key = old.split("=")[0]
    with pytest.raises(ConfigError, match=rf"`{key}` was renamed; did you mean `{new}`"):
        load_stage_config(cls, "dpa" if stage == "train-dpa" else stage, profile="demo", overrides=[old])
    cfg = load_stage_config(cls, "dpa" if stage == "train-dpa" else stage, profile="demo", overrides=[f"{new}='cpu'"])
    section, field_name = new.split(".")
    assert getattr(getattr(cfg, section), field_name) == "cpu"


def test_a_renamed_table_names_the_new_key_of_what_it_holds(tmp_path):
    from d4ir_pipeline.demo.reference_teacher import ReferenceTeacherConfig

    with pytest.raises(ConfigError, match=r"`out\.publish_dir` was renamed; did you mean `output\.publish_dir`"):
        load_config(ReferenceTeacherConfig, write(tmp_path, '[out]\npublish_dir = "x"\n'))
