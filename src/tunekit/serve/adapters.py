"""Adapters the server holds: read a run folder / PEFT adapter, decide how it is served, keep an LRU budget.

How an adapter is served, by what it is:
- "batched": the LoRA family (lora, rslora, per-module ranks and alphas, QLoRA adapters on the unquantized base):
  its factors ride in the shared base model's batch (lora_batch.py).
- "merged": methods whose result folds into the weights (DoRA, IA3, BitFit, freeze, select, full, LoRA with
  modules_to_save or bias): served as their own merged copy of the model, in a batch of their own.
- methods that neither batch nor merge (prefix, prompt, p-tuning, bottleneck adapters) are refused with a clear
  error: serve them with `tunekit generate`, which runs them unmerged.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from pathlib import Path

import torch

from .lora_batch import LoraWeights
from .runner import LINEARS

_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter folder cannot be served; the message names the folder and the reason."""


def trained_base(path: Path) -> str | None:
    """The model a run folder / adapter was trained on, as it recorded it."""
    run_config = path / "config.yaml"
    if run_config.exists():
        import yaml

        name = (yaml.safe_load(run_config.read_text()) or {}).get("model", {}).get("name")
        if name:
            return str(name)
    config = path / "adapter_config.json"
    if config.exists():
        return json.loads(config.read_text()).get("base_model_name_or_path")
    return None


def same_model(a: str, b: str) -> bool:
    """True when two model references name the same model (after resolving aliases and folders)."""
    from ..models import resolve_model_path

    def resolved(name: str) -> str:
        try:
            return str(Path(resolve_model_path(name)).resolve())
        except Exception:  # noqa: BLE001 - an unresolvable reference compares by its text
            return name

    return a == b or resolved(a) == resolved(b)


def serving_kind(path: Path) -> str:
    """'batched' or 'merged' for a folder; AdapterError for folders that are not adapters or cannot be served."""
    from ..methods import MethodError, method_for_folder

    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder; pass a tunekit run folder or a PEFT adapter folder")
    config = path / "adapter_config.json"
    if config.exists():
        try:
            cfg = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{config}: not valid JSON ({e})") from None
        peft_type = cfg.get("peft_type")
        if peft_type == "LORA":
            batchable = (not cfg.get("use_dora") and not cfg.get("modules_to_save") and cfg.get("bias", "none") == "none"
                         and not cfg.get("lora_bias"))
            return "batched" if batchable else "merged"
        if peft_type == "IA3":
            return "merged"
        raise AdapterError(f"{path}: a {peft_type} adapter cannot be batched or merged; serve it with "
                           f"`tunekit generate --adapter {path}`")
    try:
        method = method_for_folder(path)
    except (MethodError, FileNotFoundError, ValueError) as e:
        raise AdapterError(f"{path}: not an adapter or run folder ({e})") from None
    if not method.can_merge:
        raise AdapterError(f"{path}: method {method.name!r} cannot be batched or merged; serve it with "
                           f"`tunekit generate --adapter {path}`")
    return "merged"


def read_lora(name: str, path: Path, shapes: dict[str, tuple[int, int]], n_layers: int,
              dtype: torch.dtype) -> LoraWeights:
    """The factors of a PEFT LoRA folder, scale folded into B, checked against the base's module shapes."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    files = [path / "adapter_model.safetensors"]
    if not files[0].exists():
        raise AdapterError(f"{path}: adapter_model.safetensors is missing (only safetensors adapters are served)")
    tensors = load_file(str(files[0]))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _MODULE.search(key)
        if m is None:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA factor of a decoder linear layer "
                               f"({', '.join(LINEARS)}); serve this adapter merged")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes or layer >= n_layers:
            raise AdapterError(f"{path}: tensor {key!r} targets a module this model does not have: trained on "
                               f"another base model?")
        pairs.setdefault((layer, module), {})[ab] = t
    factors, ranks = {}, set()
    rslora = bool(cfg.get("use_rslora"))
    for (layer, module), ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        in_f, out_f = shapes[module]
        if a is None or b is None or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            got = (tuple(a.shape) if a is not None else None, tuple(b.shape) if b is not None else None)
            raise AdapterError(f"{path}: layer {layer} {module}: LoRA shapes {got} do not fit the base's "
                               f"({in_f} -> {out_f}): this adapter was trained on another base model")
        r = a.shape[0]
        full_name = f"model.layers.{layer}.{'self_attn' if module in LINEARS[:4] else 'mlp'}.{module}"
        alpha_pattern = cfg.get("alpha_pattern") or {}  # peft's own per-module lookup, as its LoRA layers do
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), full_name), cfg.get("lora_alpha", r))
        scale = alpha / (r ** 0.5 if rslora else r)
        factors[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        ranks.add(r)
    if not factors:
        raise AdapterError(f"{path}: adapter_model.safetensors holds no LoRA factors")
    info = {"method": "rslora" if rslora else "lora", "max_rank": max(ranks), "ranks": sorted(ranks),
            "modules": sorted({m for _, m in factors}), "use_dora": bool(cfg.get("use_dora"))}
    return LoraWeights(name, factors, info)


class AdapterBudget:
    """LRU order of loaded adapters with pinning: `touch` on use; `victim` is the least recently used unpinned."""

    def __init__(self, max_adapters: int):
        self.max_adapters = max_adapters
        self.order: OrderedDict[str, float] = OrderedDict()
        self.pinned: set[str] = set()

    def touch(self, name: str) -> None:
        self.order[name] = time.monotonic()
        self.order.move_to_end(name)

    def remove(self, name: str) -> None:
        self.order.pop(name, None)
        self.pinned.discard(name)

    def victim(self, busy: set[str]) -> str | None:
        """Who to unload to make room (None: room left, or nobody can go)."""
        if len(self.order) < self.max_adapters:
            return None
        for name in self.order:
            if name not in self.pinned and name not in busy:
                return name
        return None

    def full(self) -> bool:
        return len(self.order) >= self.max_adapters
