"""Several adapters on one base model: load by name, switch, disable, delete, combine into a new adapter.

A thin layer over HF peft's multi-adapter API (one PeftModel holding named adapters; `set_adapter`,
`disable_adapter`, `delete_adapter`, `add_weighted_adapter`), with tunekit's checks and errors on top:

    adapters = AdapterSet("smollm2-135m")
    adapters.load("invoices", "runs/invoices")
    adapters.load("support", "runs/support")
    adapters.use("support");  adapters.model.generate(...)
    with adapters.disabled(): ...                                   # the base model alone
    adapters.combine("both", {"invoices": 0.5, "support": 0.5}, how="ties", density=0.5)
    adapters.save("both", "runs/both")                              # a normal PEFT adapter folder

Combination types are peft's (`COMBINATIONS`). For LoRA, `linear`/`ties`/`dare_*`/`magnitude_prune` combine the A
and B matrices separately (each scaled by sqrt(weight x scaling)), so they need equal ranks and are exact only when a
single adapter has a non-zero weight; `cat` stacks the ranks (exactly sum_i w_i B_i A_i); the `*_svd` types combine
the full delta weights and re-factorise them to `svd_rank`. TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708)
keeps the `density` largest entries per adapter and resolves sign conflicts; DARE (Yu et al. 2023,
https://arxiv.org/abs/2311.03099) drops entries at random with rate 1 - density and rescales the rest. IA3 adapters
combine linearly (their scaling vectors are weighted and summed).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .methods.base import METHOD_FILE, MethodError
from .models import load_model

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))


def peft_type_of(path: Path) -> str:
    """The peft_type of an adapter folder (LORA, IA3, ...); MethodError for anything that is not a PEFT adapter."""
    config = path / "adapter_config.json"
    if not config.exists():
        if (path / METHOD_FILE).exists():
            raise MethodError(f"{path} holds a tunekit-format result (adapter/bitfit/freeze): only PEFT adapters "
                              f"(lora, qlora, ia3, prefix, prompt, ptuning) can share a base; merge it instead")
        raise FileNotFoundError(f"{path}: no adapter_config.json; pass a tunekit run folder or a PEFT adapter folder")
    return json.loads(config.read_text()).get("peft_type", "?")


class AdapterSet:
    """One base model with named PEFT adapters of one kind (all LoRA, or all IA3, ...)."""

    def __init__(self, base: str | nn.Module = "smollm2-135m", device: str = "cpu"):
        self.base = load_model(base, dtype="float32", device=device) if isinstance(base, str) else base
        self.model = None  # the PeftModel once the first adapter is loaded
        self.peft_type: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.model.peft_config) if self.model is not None else []

    @property
    def active(self) -> str | None:
        return self.model.active_adapter if self.model is not None and self.names else None

    def _check_name(self, name: str) -> None:
        if name not in self.names:
            raise MethodError(f"no adapter named {name!r}; loaded adapters: {', '.join(self.names) or '(none)'}")

    def load(self, name: str, path: str | Path) -> None:
        """Load the adapter folder `path` under `name` (it becomes the active one)."""
        from peft import PeftModel

        path = Path(path)
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise MethodError(f"adapter name {name!r}: use letters, digits, '-' or '_'")
        if name in self.names:
            raise MethodError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        peft_type = peft_type_of(path)
        if self.peft_type is not None and peft_type != self.peft_type:
            raise MethodError(f"{path} is a {peft_type} adapter but the loaded ones ({', '.join(self.names)}) are "
                              f"{self.peft_type}: several adapters on one base must be of the same method")
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.model.load_adapter(str(path), adapter_name=name)
        self.peft_type = peft_type
        self.use(name)

    def use(self, name: str) -> None:
        """Make `name` the active adapter."""
        self._check_name(name)
        self.model.set_adapter(name)
        self.model.eval()

    @contextlib.contextmanager
    def disabled(self):
        """Inside this block the model computes the base model alone."""
        if self.model is None:
            yield
            return
        with self.model.disable_adapter():
            yield

    def delete(self, name: str) -> None:
        self._check_name(name)
        self.model.delete_adapter(name)
        if not self.names:
            self.peft_type = None
        elif self.active not in self.names:
            self.use(self.names[0])

    def combine(self, new_name: str, weights: dict[str, float], how: str = "linear", density: float | None = None,
                svd_rank: int | None = None, majority_sign: str = "total") -> None:
        """Add adapter `new_name` = the adapters in `weights` combined by `how` (peft's add_weighted_adapter)."""
        if self.model is None:
            raise MethodError("load adapters before combining them")
        for name in weights:
            self._check_name(name)
        if new_name in self.names:
            raise MethodError(f"an adapter named {new_name!r} already exists; pick another name")
        if len(weights) < 1:
            raise MethodError("give at least one adapter to combine")
        if self.peft_type == "IA3":
            if how != "linear":
                raise MethodError(f"IA3 adapters combine only linearly (their scaling vectors), not with {how!r}")
            self.model.add_weighted_adapter(list(weights), list(weights.values()), new_name)
        elif self.peft_type == "LORA":
            self._combine_lora(new_name, weights, how, density, svd_rank, majority_sign)
        else:
            raise MethodError(f"{self.peft_type} adapters cannot be combined; only LoRA (any combination: "
                              f"{', '.join(COMBINATIONS)}) and IA3 (linear) can")
        self.use(new_name)

    def _combine_lora(self, new_name, weights, how, density, svd_rank, majority_sign) -> None:
        if how not in COMBINATIONS:
            raise MethodError(f"unknown combination {how!r}; choose one of: {', '.join(COMBINATIONS)}")
        if how in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
            raise MethodError(f"combination {how!r} needs a density in (0, 1] (the share of entries kept)")
        if majority_sign not in ("total", "frequency"):
            raise MethodError(f"majority_sign {majority_sign!r}: choose total or frequency")
        configs = {n: self.model.peft_config[n] for n in weights}
        dora = [n for n, c in configs.items() if c.use_dora]
        if dora:
            raise MethodError(f"adapter(s) {', '.join(dora)} use DoRA: their magnitude vectors cannot be combined; "
                              f"merge them into the base instead (tunekit merge)")
        ranks = {n: c.r for n, c in configs.items()}
        if how in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") and len(set(ranks.values())) > 1:
            raise MethodError(f"combination {how!r} needs equal ranks, got {ranks}; use cat or an *_svd combination")
        first = configs[next(iter(weights))]
        # peft copies the first adapter's config for the new one; rsLoRA there would rescale the new adapter by
        # sqrt(r) although the sources' scalings are already folded into its weights.
        rslora = first.use_rslora
        first.use_rslora = False
        try:
            self.model.add_weighted_adapter(list(weights), list(weights.values()), new_name, combination_type=how,
                                            density=density, svd_rank=svd_rank, majority_sign_method=majority_sign)
        finally:
            first.use_rslora = rslora

    def save(self, name: str, out_dir: str | Path) -> Path:
        """Write adapter `name` as a plain PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self._check_name(name)
        out_dir = Path(out_dir)
        with tempfile.TemporaryDirectory(prefix="tunekit-adapter-") as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
            src = Path(tmp) / name if name != "default" else Path(tmp)  # peft nests non-default names
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, out_dir / f.name)
        return out_dir

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the active adapter (or of the base inside `disabled()`)."""
        model = self.model if self.model is not None else self.base
        model.eval()
        return model(input_ids=input_ids).logits.float()


def combine_adapters(base: str, adapters: dict[str, str], how: str, weights: list[float] | None, out: str,
                     density: float | None = None, svd_rank: int | None = None, device: str = "cpu") -> Path:
    """Load `adapters` ({name: folder}) on `base`, combine them by `how` with `weights` (default: equal), save the
    result as a PEFT adapter folder `out` (with the tokenizer of `base`)."""
    from .models import load_tokenizer

    if len(adapters) < 2:
        raise MethodError("combine needs at least two adapters (--adapter name=PATH, repeated)")
    weights = weights or [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise MethodError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    aset = AdapterSet(base, device=device)
    for name, path in adapters.items():
        aset.load(name, path)
    new_name = "combined"
    while new_name in adapters:
        new_name += "_"
    aset.combine(new_name, dict(zip(adapters, weights)), how=how, density=density, svd_rank=svd_rank)
    out_dir = aset.save(new_name, out)
    load_tokenizer(base).save_pretrained(out_dir)
    return out_dir
