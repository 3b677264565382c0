"""Bottleneck adapters, our own implementation (HF peft has none).

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751) put a small bottleneck after the attention and after the
MLP of every transformer layer; Pfeiffer et al. 2020 (https://arxiv.org/abs/2005.00247) after the MLP only
(`placement`). Each adapter maps the sublayer's output h (B, T, H) to

    h + up(act(down(h)))        down: H -> bottleneck, up: bottleneck -> H (weight and bias zero at start)

before the decoder layer adds it to the residual stream. With `up` zero-initialised a fresh adapter is the
identity, so it reproduces the base model's logits exactly. The adapter is attached with a forward hook on the
sublayer (`self_attn` / `mlp` in Llama) and registered as that sublayer's child module `bottleneck_adapter`, so
the base model's own parameter names are untouched and transformers is not edited.

Saved format (in the run folder):
    tunekit_method.json           {"format": "tunekit", "version": 1, "method": {name: adapter, placement,
                                   bottleneck, activation}, "hidden_size": H, "sites": [sublayer paths]}
    tunekit_weights.safetensors   "<site>.bottleneck_adapter.{down,up}.{weight,bias}" for every site, e.g.
                                   "model.layers.0.mlp.bottleneck_adapter.down.weight" (bottleneck, H)
`load` re-creates the adapters on a fresh base model and copies the tensors in. Adapters add a nonlinearity, so
they cannot be merged into the base weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import AdapterMethod
from .base import Method, MethodError, copy_tensors_, read_own_format, save_own_format
from .targets import ATTENTION_PARENTS, MLP_PARENTS, decoder_layers

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
ADAPTER = "bottleneck_adapter"


class Bottleneck(nn.Module):
    """h (..., H) -> h + up(act(down(h))), with `up` zero-initialised (the identity at start)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return h + delta.to(h.dtype)


def _adapter_hook(module: nn.Module, args, output):
    """Forward hook: run the sublayer's adapter on its output (attention returns (output, weights))."""
    adapter = getattr(module, ADAPTER)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def sublayer_name(layer: nn.Module, group: tuple[str, ...], what: str) -> str:
    # Blocks holding linear layers whose name says what they are (post_attention_layernorm is not attention).
    names = [n for n, m in layer.named_children() if any(k in n.lower() for k in group)
             and any(isinstance(sub, nn.Linear) for sub in m.modules())]
    if len(names) != 1:
        raise MethodError(f"cannot tell the {what} block of {type(layer).__name__} (children: "
                          f"{', '.join(n for n, _ in layer.named_children())}); bottleneck adapters need one")
    return names[0]


def adapter_sites(lm: nn.Module, placement: str) -> list[str]:
    """Paths of the sublayers that get an adapter: attention + MLP (houlsby) or MLP only (pfeiffer), per layer."""
    path, layers = decoder_layers(lm)
    sites = []
    for i, layer in enumerate(layers):
        if placement == "houlsby":
            sites.append(f"{path}.{i}.{sublayer_name(layer, ATTENTION_PARENTS, 'attention')}")
        sites.append(f"{path}.{i}.{sublayer_name(layer, MLP_PARENTS, 'MLP')}")
    return sites


class BottleneckAdapter(Method):
    name = "adapter"

    def __init__(self, cfg: AdapterMethod):
        self.cfg = cfg

    def apply(self, model: nn.Module) -> nn.Module:
        hidden = model.config.get_text_config().hidden_size
        if self.cfg.bottleneck > hidden:
            raise MethodError(f"adapter bottleneck {self.cfg.bottleneck} is larger than the model's hidden size "
                              f"{hidden}; choose at most {hidden} (typically hidden/16 .. hidden/4)")
        for p in model.parameters():
            p.requires_grad_(False)
        device = model.get_input_embeddings().weight.device
        for site in adapter_sites(model, self.cfg.placement):
            sublayer = model.get_submodule(site)
            if hasattr(sublayer, ADAPTER):
                raise MethodError(f"{site} already has a bottleneck adapter")
            sublayer.add_module(ADAPTER, Bottleneck(hidden, self.cfg.bottleneck, self.cfg.activation).to(device))
            sublayer.register_forward_hook(_adapter_hook)
        return model

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if f".{ADAPTER}." in n}

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_own_format(out_dir, self.cfg, self.adapter_tensors(model),
                        hidden_size=model.config.get_text_config().hidden_size,
                        sites=adapter_sites(model, self.cfg.placement))

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        _, tensors = read_own_format(path, self.name)
        model = self.apply(base)
        missing = sorted(set(self.adapter_tensors(model)) - set(tensors))
        if missing:
            raise MethodError(f"{path}: adapter tensors missing: {', '.join(missing[:5])}")
        copy_tensors_(model, tensors, path)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise MethodError("bottleneck adapters cannot be merged into the base weights (the adapter has a "
                          "nonlinearity between its two projections); serve the run folder as an adapter instead "
                          "(tunekit generate --adapter RUN_DIR, or tunekit.methods.load_saved_method(base, RUN_DIR))")
