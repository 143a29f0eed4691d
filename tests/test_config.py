from pathlib import Path

import pytest

from pocketlm import config as configlib
from pocketlm.config import PRESET_DIR, Config
from pocketlm.errors import ConfigError


def test_defaults_validate_and_round_trip(tmp_path: Path) -> None:
    cfg = Config().validate()
    configlib.save_yaml(cfg, tmp_path / "c.yaml")
    assert configlib.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads(preset: str) -> None:
    cfg = configlib.load(preset)
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_presets_exist() -> None:
    names = {p.stem for p in PRESET_DIR.glob("*.yaml")}
    assert {"quickstart", "small-cpu", "single-gpu", "gpt2-small"} <= names
    gpt2 = configlib.load("gpt2-small").model
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)


def test_cli_strings_are_typed() -> None:
    cfg = configlib.load(cli_overrides={"train.lr": "3e-4", "model.n_layer": "6", "model.bias": "false",
                                        "sample.stop": ["\n\n"]})
    assert cfg.train.lr == 3e-4 and cfg.model.n_layer == 6 and cfg.model.bias is False
    assert cfg.sample.stop == ["\n\n"]


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 1\n")
    cfg = configlib.load(f, cli_overrides={"model.n_layer": "5"})
    assert cfg.model.n_layer == 5 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("key, hint", [("train.lrr", "train.lr"), ("model.n_layers", "model.n_layer"),
                                       ("trian.lr", "train")])
def test_unknown_keys_suggest_the_closest(key: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        configlib.load(overrides={key: 1})


def test_unknown_yaml_key_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        configlib.load(f)


@pytest.mark.parametrize("overrides, message", [
    ({"model.n_layer": "four"}, "expects int"),
    ({"model.bias": "maybe"}, "expects bool"),
])
def test_wrong_types_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configlib.load(cli_overrides=overrides)


def test_wrong_yaml_type_rejected(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 2.5\n")
    with pytest.raises(ConfigError, match="model.n_layer expects int"):
        configlib.load(f)


def test_n_embd_must_divide_by_n_head() -> None:
    with pytest.raises(ConfigError, match="divisible.*try --model.n_head 4"):
        configlib.load(overrides={"model.n_embd": 128, "model.n_head": 5})


def test_missing_preset_lists_the_bundled_ones() -> None:
    with pytest.raises(ConfigError, match="bundled presets: .*small-cpu"):
        configlib.load("no-such-preset")
