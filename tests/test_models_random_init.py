"""`random:<config>` model references: random weights from a config, made once, with a usable tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from tunekit.models import ModelError, load_model, load_tokenizer, resolve_model_path


def write_config(path, vocab: int, **extra):
    cfg = {"model_type": "llama", "vocab_size": vocab, "tie_word_embeddings": True,
           "_comment": "ignored by the build", **TINY, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def test_random_model_is_built_once_per_config_and_seed(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("TUNEKIT_CACHE", str(tmp_path / "cache"))
    tokenizer.save_pretrained(tmp_path / "shape")  # a tokenizer next to the config is the one used
    config = write_config(tmp_path / "shape" / "tiny.json", len(tokenizer))
    folder = resolve_model_path(f"random:{config}")
    assert resolve_model_path(f"random:{config}") == folder  # cached: the same folder, not rebuilt
    model = load_model(f"random:{config}")
    assert model.config.num_hidden_layers == TINY["num_hidden_layers"]
    assert model.config.pad_token_id == tokenizer.pad_token_id  # the tokenizer's ids, not the origin's
    assert sum(p.numel() for p in model.parameters()) > 0
    assert load_tokenizer(f"random:{config}").get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tokenizer.encode("hello there")])
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(tokenizer)
    # Another config gives another folder; the comment key does not count.
    other = write_config(tmp_path / "shape" / "other.json", len(tokenizer), num_hidden_layers=1)
    assert resolve_model_path(f"random:{other}") != folder
    write_config(config, len(tokenizer), _comment="changed")
    assert resolve_model_path(f"random:{config}") == folder


def test_presets_resolve_by_name_and_bad_configs_say_why(tmp_path, tokenizer):
    from tunekit.models import _config_file, cache_dir

    assert _config_file("llama-3.2-1b").name == "llama-3.2-1b.json"
    with pytest.raises(ModelError, match="no config found.*llama-3.2-1b"):
        resolve_model_path("random:no-such-model")
    small = write_config(tmp_path / "small.json", 1000)  # no tokenizer beside it: the packaged model's
    with pytest.raises(ModelError, match="vocab_size 1000 is smaller than the tokenizer's 49152 .*smollm2-135m"):
        resolve_model_path(f"random:{small}")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelError, match="broken.json: not valid JSON"):
        resolve_model_path(f"random:{broken}")
    assert not list(cache_dir().glob("models/random-small-*"))  # nothing half-made


def test_the_planner_reads_a_random_models_shape_without_building_it(tmp_path, monkeypatch):
    from tunekit.planner import load_shape

    monkeypatch.setenv("TUNEKIT_CACHE", str(tmp_path / "cache"))
    shape = load_shape("random:llama-3.2-1b")
    preset = load_shape("llama-3.2-1b")
    assert (shape.layers, shape.hidden, shape.vocab) == (preset.layers, preset.hidden, preset.vocab) == (16, 2048, 128256)
    assert not (tmp_path / "cache").exists()  # no weights built for a plan
