"""One data owner's round: tunekit's own training loop, started from the federation's global adapter.

The engine builds its method with `build_method(cfg.method)`; for a federated round the method is wrapped
(`StartFrom`) so that right after the method injects its modules the trainable tensors take the global values
(and, for FFA-LoRA, the lora_A tensors stop training), and so that the trained tensors and the number of training
examples are read back from the live model when the engine saves. Everything else (data, token-weighted loss,
precision, schedule) is the engine's single-process run, unchanged.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..config import Config
from .aggregate import FederatedError

# LoRA inits that move part of W into A, B: the adapter then only fits a modified base, which owners cannot share.
BASE_CHANGING_INITS = ("pissa", "olora")


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter of every tensor the method trains (its names are the federation's tensor names)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_in_round(names, aggregation: str) -> set[str]:
    """Tensors an owner keeps at the global value: FFA-LoRA (arXiv:2403.12313) freezes every lora_A."""
    return {n for n in names if "lora_A" in n} if aggregation == "ffa" else set()


def check_federable(cfg: Config, aggregation: str) -> None:
    """A method the federation can average: LoRA-style inits that leave the base weights alone."""
    init = getattr(cfg.method, "init", "default")
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise FederatedError(f"method.init {init!r} changes the base weights, so owners' adapters would fit "
                             f"different bases: use init default, gaussian or orthogonal")
    if aggregation == "ffa" and cfg.method.name not in ("lora", "qlora"):
        raise FederatedError(f"aggregation ffa freezes LoRA's A matrices; method {cfg.method.name!r} has none: "
                             f"use fedavg or svd")


class StartFrom:
    """A Method that starts from `tensors` and keeps `frozen` ones fixed; every other call goes to `inner`."""

    def __init__(self, inner, tensors: dict[str, torch.Tensor] | None, frozen: set[str]):
        self._inner, self._start, self._frozen = inner, tensors, frozen
        self.n_examples = 0
        self.trained: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self._params: dict[str, torch.nn.Parameter] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def prepare(self, model, batches, forward_loss, device) -> None:
        self.n_examples = len(batches.examples)  # the FedAvg weight: training examples after the engine's split
        self._inner.prepare(model, batches, forward_loss, device)

    def apply(self, model):
        model = self._inner.apply(model)
        # Parameter objects, captured before compile/fused wrappers may rename the modules around them.
        self._params = trainable_tensors(model)
        self.names = sorted(self._params)
        if self._start is not None:
            copy_into_(self._params, self._start)
        for name in self._frozen:
            self._params[name].requires_grad_(False)
        return model

    def save(self, model, out_dir: Path) -> None:
        # (the trained values, fp32 for transport; frozen ones are the global values exactly, not a bf16 copy)
        self.trained = {n: p.detach().float().clone() for n, p in self._params.items() if n not in self._frozen}
        self._inner.save(model, out_dir)


def copy_into_(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Set each parameter to the global tensor of the same name (mutates `params`); shapes must agree."""
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise FederatedError(f"the server's adapter has other tensors than this owner's method builds (missing "
                             f"{missing[:3]}, unexpected {extra[:3]}): every owner must use the federation's "
                             f"method, rank and target modules")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise FederatedError(f"tensor {name}: the server sent shape {tuple(tensors[name].shape)}, this "
                                     f"owner's method builds {tuple(p.shape)}: same method.r and target modules "
                                     f"everywhere")
            p.copy_(tensors[name].to(p.dtype))


@contextlib.contextmanager
def engine_method(wrapper_factory):
    """Within the block, the engine builds its method through `wrapper_factory(method)` (one process: the
    Flower ClientApp runs each round in a fresh one)."""
    from ..engine import loop

    original = loop.build_method
    loop.build_method = lambda section: wrapper_factory(original(section))
    try:
        yield
    finally:
        loop.build_method = original


def train_round(cfg: Config, start: dict[str, torch.Tensor] | None, aggregation: str) -> StartFrom:
    """K local steps (cfg.train.max_steps) of the engine from the global tensors `start`; the returned wrapper
    holds `trained` (name -> fp32 tensor, frozen ones left out) and `n_examples`."""
    from ..engine import train

    holder: list[StartFrom] = []

    def wrap(method):
        names = [n for n in (start or {})]
        holder.append(StartFrom(method, start, frozen_in_round(names, aggregation)))
        return holder[-1]

    with engine_method(wrap):
        train(cfg)
    return holder[-1]


def initial_tensors(cfg: Config) -> tuple[dict[str, torch.Tensor], torch.nn.Module, object]:
    """The shared starting adapter (the method's own seeded init on the base model), with the model and method
    that hold it: the server writes every round's adapter through them in the method's own format."""
    from ..methods import build_method
    from ..models import load_model

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    method = build_method(cfg.method)
    model = method.apply(model)
    return {n: p.detach().float().clone() for n, p in trainable_tensors(model).items()}, model, method


def save_adapter(model, method, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write `tensors` as the method's adapter (PEFT format for LoRA) into `out_dir`, loadable by eval/serve."""
    copy_into_(trainable_tensors(model), tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    method.save(model, out_dir)


def local_config(training: dict, data: Path, work: Path, number: int, steps: int) -> Config:
    """The owner's tunekit config for this round: its file, K steps, a per-round data order, no checkpoints."""
    tree = json.loads(json.dumps(training))
    tree.setdefault("data", {})["train"] = str(data)
    train = tree.setdefault("train", {})
    train.update({"output_dir": str(work / f"round-{number:04d}"), "max_steps": steps, "save_every": 0,
                  "progress": False, "seed": int(train.get("seed", 0)) + number, "resume": False})
    return Config.model_validate(tree)


def last_loss(run_dir: Path) -> float:
    """The engine's last logged training loss of a round (metrics.jsonl)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in lines if "loss" in r]
    return float(losses[-1]) if losses else float("nan")


def eval_loss_on(cfg: Config, model, method, path: str) -> float:
    """The global adapter's loss per answer token on `path` (the engine's token-weighted evaluate_loss)."""
    from ..data import prepare_data
    from ..engine.device import resolve_precision
    from ..engine.loop import evaluate_loss
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data.model_copy(update={"train": path, "validation": None, "val_fraction": 0.0}),
                        tokenizer)
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    return evaluate_loss(model, method, data.train, cfg.train.batch_size, False, tokenizer.pad_token_id,
                         torch.device("cpu"), precision)

