"""Fine-tuning methods, one module each, behind the interface in base.py."""

from __future__ import annotations

import logging

from ..config import (AdapterMethod, BitFitMethod, FreezeMethod, FullMethod, IA3Method, LoraMethod, PrefixMethod,
                      PromptMethod, PTuningMethod, QLoraMethod, SelectMethod)
from .adapter import BottleneckAdapter
from .base import Method, MethodError, cast_frozen_linears_, count_parameters, trainable_named_parameters
from .bitfit import BitFit
from .freeze import Freeze
from .full import Full
from .ia3 import IA3
from .lora import Lora
from .prefix import PrefixTuning
from .prompt import PromptTuning
from .ptuning import PTuning
from .qlora import QLora
from .select import Select

# bitsandbytes (imported by peft when installed) logs a warning at import on AVX512-BF16 CPUs when the optional
# `kernels` package is missing; its own CPU kernels are used instead, so the message is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_REGISTRY = {LoraMethod: Lora, FullMethod: Full, QLoraMethod: QLora, PrefixMethod: PrefixTuning,
             PromptMethod: PromptTuning, PTuningMethod: PTuning, IA3Method: IA3, AdapterMethod: BottleneckAdapter,
             BitFitMethod: BitFit, FreezeMethod: Freeze, SelectMethod: Select}


def build_method(cfg) -> Method:
    """The Method object for a method config section."""
    try:
        return _REGISTRY[type(cfg)](cfg)
    except KeyError:
        raise MethodError(f"no implementation for method config {type(cfg).__name__}") from None


def saved_method(path) -> Method:
    """The Method that wrote a run folder in tunekit's own format (adapter, bitfit, freeze), from its JSON."""
    import json
    from pathlib import Path

    from ..config import METHODS
    from .base import METHOD_FILE

    section = json.loads((Path(path) / METHOD_FILE).read_text()).get("method", {})
    if section.get("name") not in METHODS:
        raise MethodError(f"{path}/{METHOD_FILE}: unknown method {section.get('name')!r}")
    return build_method(METHODS[section["name"]](**section))


# peft_type in a plain PEFT adapter_config.json -> our method (for folders written by peft itself, without a config.yaml)
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}


def method_for_folder(path) -> Method:
    """The Method that wrote a run folder or adapter folder: from its config.yaml (tunekit run), its
    tunekit_method.json (adapter, bitfit, freeze) or its adapter_config.json (any PEFT adapter)."""
    import json
    from pathlib import Path

    import yaml

    from ..config import METHODS
    from .base import METHOD_FILE

    path = Path(path)
    run_config = path / "config.yaml"
    if run_config.exists():
        section = (yaml.safe_load(run_config.read_text()) or {}).get("method")
        if isinstance(section, dict) and section.get("name") in METHODS:
            return build_method(METHODS[section["name"]](**section))
    if (path / METHOD_FILE).exists():
        return saved_method(path)
    if (path / "adapter_config.json").exists():
        peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
        if peft_type not in PEFT_TYPES:
            raise MethodError(f"{path}/adapter_config.json: peft_type {peft_type!r} is not one tunekit handles "
                              f"({', '.join(PEFT_TYPES)})")
        return build_method(METHODS[PEFT_TYPES[peft_type]]())
    if (path / "config.json").exists():
        return build_method(METHODS["full"]())
    raise MethodError(f"{path}: not a tunekit run folder or adapter (no config.yaml, {METHOD_FILE}, "
                      f"adapter_config.json or config.json)")


def load_saved_method(base, path):
    """`base` with a run folder in tunekit's own format (adapter, bitfit, freeze) attached."""
    return saved_method(path).load(base, path)


__all__ = ["Method", "MethodError", "cast_frozen_linears_", "build_method", "count_parameters",
           "load_saved_method", "method_for_folder", "saved_method",
           "trainable_named_parameters"]
