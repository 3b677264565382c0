"""The typed config: YAML + dotted overrides, errors that name the key and list the valid choices, presets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tunekit.config import (
    METHODS,
    Config,
    ConfigError,
    DataConfig,
    FullMethod,
    LoraMethod,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_to_yaml,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def write(tmp_path, tree, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


def listed(message: str, names) -> bool:
    """The message lists all `names`, comma separated and sorted (as the config errors do)."""
    return ", ".join(sorted(names)) in message


def test_defaults_are_the_field_defaults():
    dumped = load_config().model_dump()
    for section, cls in SECTIONS.items():
        for name, field in cls.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            assert dumped[section][name] == default, f"{section}.{name}"
    assert dumped["method"] == LoraMethod().model_dump()


def test_yaml_then_dotted_overrides(tmp_path):
    path = write(tmp_path, {"model": {"name": "m"}, "method": {"name": "lora", "r": 8},
                            "optim": {"lr": 1e-3}, "train": {"max_steps": 10, "output_dir": "x"}})
    cfg = load_config(path, {"train.max_steps": 20, "method.alpha": 4, "data.packing": False,
                             "optim.betas": [0.8, 0.95], "method.target_modules": ["q_proj"]})
    expected = Config().model_dump()
    expected["model"]["name"] = "m"
    expected["method"].update(r=8, alpha=4.0, target_modules=["q_proj"])
    expected["optim"].update(lr=1e-3, betas=(0.8, 0.95))
    expected["train"].update(max_steps=20, output_dir="x")  # the flag wins over the file
    expected["data"]["packing"] = False
    assert cfg.model_dump() == expected


@pytest.mark.parametrize("method", list(METHODS))
def test_method_shorthand(tmp_path, method):
    short = load_config(write(tmp_path, {"method": method}))
    assert short.method == METHODS[method]()
    assert load_config(None, {"method": method}).method == METHODS[method]()


def test_method_shorthand_in_yaml_with_a_dotted_override(tmp_path):
    cfg = load_config(write(tmp_path, {"method": "full"}), {"method.freeze_embeddings": True})
    assert cfg.method == FullMethod(freeze_embeddings=True)
    cfg = load_config(None, {"method.name": "full", "method.freeze_embeddings": True})
    assert cfg.method == FullMethod(freeze_embeddings=True)


@pytest.mark.parametrize("source", ["flags", "yaml"])
def test_method_options_without_a_name_mean_the_default_lora(tmp_path, source):
    # The CLI usage text itself gives `--method.r 8` as an example.
    if source == "flags":
        cfg = load_config(None, {"method.r": 8})
    else:
        cfg = load_config(write(tmp_path, {"method": {"r": 8}}))
    assert cfg.method == LoraMethod(r=8)


def test_unknown_top_level_key_lists_the_sections(tmp_path):
    msg = error(write(tmp_path, {"modle": {"name": "x"}}))
    assert "modle" in msg and listed(msg, Config.model_fields)
    assert str(tmp_path / "c.yaml") in msg


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_unknown_nested_key_lists_the_section_keys(section):
    msg = error(None, {f"{section}.no_such_key": 1})
    assert f"{section}.no_such_key" in msg
    assert listed(msg, SECTIONS[section].model_fields)


@pytest.mark.parametrize("method", list(METHODS))
def test_unknown_key_inside_method_lists_its_options(tmp_path, method):
    msg = error(write(tmp_path, {"method": {"name": method, "rank": 4}}))
    assert "rank" in msg and repr(method) in msg
    assert listed(msg, METHODS[method].model_fields)


def test_option_of_another_method_names_the_method_and_its_options():
    msg = error(None, {"method": "full", "method.r": 8})
    assert "r do not belong to method 'full'" in msg
    assert listed(msg, FullMethod.model_fields)
    msg = error(None, {"method.name": "lora", "method.freeze_embeddings": True})
    assert "freeze_embeddings" in msg and "'lora'" in msg and listed(msg, LoraMethod.model_fields)


def test_unknown_method_lists_the_methods():
    msg = error(None, {"method": "lokr"})
    assert "lokr" in msg and ", ".join(METHODS) in msg


@pytest.mark.parametrize("key, value, words", [
    ("train.max_steps", "abc", ["train.max_steps", "integer"]),
    ("train.max_steps", 0, ["train.max_steps", "greater than or equal to 1"]),
    ("optim.lr", -1.0, ["optim.lr", "greater than 0"]),
    ("model.dtype", "int8", ["model.dtype", "'float32', 'bfloat16' or 'float16'"]),
    ("data.val_fraction", 1.0, ["data.val_fraction", "less than 1"]),
    ("train.precision", "fp8", ["train.precision"]),
])
def test_type_errors_name_the_key(key, value, words):
    msg = error(None, {key: value})
    for w in words:
        assert w in msg


def test_type_error_inside_method_names_the_dotted_key(tmp_path):
    msg = error(write(tmp_path, {"method": {"name": "lora", "r": "eight"}}))
    assert "method.r:" in msg and "integer" in msg


def test_numbers_written_like_flags_are_parsed():
    # Flag values are YAML; PyYAML reads '1e-4' as a string, which the typed fields still accept.
    from tunekit.config import parse_value

    cfg = load_config(None, {"optim.lr": parse_value("1e-4"), "optim.max_grad_norm": parse_value("null"),
                             "train.max_steps": parse_value("3"), "data.packing": parse_value("false"),
                             "method.name": "lora", "method.target_modules": parse_value("[q_proj, v_proj]")})
    assert cfg.optim.lr == 1e-4 and cfg.optim.max_grad_norm is None and cfg.train.max_steps == 3
    assert cfg.data.packing is False and cfg.method.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("content, words", [
    (None, ["not found"]),
    ("train: [unclosed", ["not valid YAML"]),
    ("- a\n- b\n", ["top level must be a mapping", "model, data, method, optim, train"]),
])
def test_bad_files(tmp_path, content, words):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    msg = error(path)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_do_not_change_the_caller_dict():
    overrides = {"train.max_steps": 5}
    before = copy.deepcopy(overrides)
    load_config(None, overrides)
    assert overrides == before


PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_presets_exist():
    assert PRESETS, f"no presets in {CONFIGS}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    raw = yaml.safe_load(preset.read_text())
    # Every value the file sets is the value the config holds (nothing silently dropped or renamed).
    dumped = cfg.model_dump(mode="json")
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == (list(value) if isinstance(value, tuple) else value), \
                    f"{preset.name}: {section}.{key}"
    again = load_config(write(tmp_path, config_to_yaml(cfg)))
    assert again == cfg


def test_api_train_builds_the_same_config_from_every_form(monkeypatch, tmp_path):
    import tunekit.engine
    from tunekit import api

    seen = []
    monkeypatch.setattr(tunekit.engine, "train", seen.append)
    cfg = load_config(None, {"method.name": "lora", "method.r": 8, "method.target_modules": ["q_proj"],
                             "optim.betas": [0.8, 0.9], "train.report_to": ["tensorboard"]})
    api.train(cfg)
    api.train(cfg, **{"train.max_steps": 3})
    api.train(cfg.model_dump(), **{"train.max_steps": 3})
    api.train(write(tmp_path, cfg.model_dump(mode="json")), **{"train.max_steps": 3})
    assert seen[0] is cfg
    expected = cfg.model_copy(deep=True)
    expected.train.max_steps = 3
    assert seen[1:] == [expected] * 3
