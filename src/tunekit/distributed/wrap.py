"""The training forward as a module DDP or FSDP2 can hook, the loss scale that keeps the loss exact, no_sync.

Exact token weighting across ranks: a step's loss is sum(token losses of the global batch) / N, N the label
tokens of the whole global batch (all ranks, all micro-batches). Each rank backpropagates its own summed loss
times c / N; the gradient reduction then divides by c (DDP averages: c = world size; FSDP2 is set to sum here:
c = 1), so every rank ends with sum over ranks of grad(loss_sum_r) / N: the single-process gradient of the same
global batch, however unevenly the tokens fall across ranks. A per-rank mean (loss_sum_r / N_r, then averaged)
weighs a token on a rank with few targets more than one on a busy rank; tests/test_distributed.py shows it off
by far more than the 1e-6 this matches to.

FSDP2 and gloo: FSDP2 asks for ReduceOp.AVG in its reduce-scatter when it is free to (fp32/bf16 gradients;
`_get_gradient_divide_factors` in torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, torch 2.13), and
gloo has been reported to sum instead, world-size times too large (pytorch/pytorch#162338, still open). On torch
2.13.0+cpu the probe in tests/test_distributed.py measures a correct average, but tunekit does not depend on it:
set_force_sum_reduction_for_comms(True) with a divide factor of 1 makes FSDP2 reduce with SUM on every backend,
and the loss scale above does the division.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .context import DistContext, DistributedError


class LossForward(nn.Module):
    """objective.loss_sum(model, method, head, batch) as a module's forward: DDP and FSDP2 hook a module's
    forward, and the methods reach the decoder and the head directly (Method.hidden_states), not through
    model.forward. The model is its one submodule; the objective and method are plain attributes."""

    def __init__(self, model: nn.Module, objective, method):
        super().__init__()
        self.model = model
        self.__dict__["_objective"] = objective  # not registered: a teacher model inside it never trains
        self.__dict__["_method"] = method

    def forward(self, batch, gold: bool = False):
        """(summed loss, {part: value}) of the objective; gold=True: (summed cross-entropy, targets), the
        evaluation loss (engine/objective.gold_loss_sum)."""
        method = self._method
        head = method.lm_head(self.model)
        if gold:
            from ..engine.objective import gold_loss_sum  # here: engine/loop.py imports this module

            return gold_loss_sum(self.model, method, head, batch)
        return self._objective.loss_sum(self.model, method, head, batch)


def decoder_layers(method, model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, each its own FSDP2 unit (its parameters gathered only while it runs)."""
    decoder = method.causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DistributedError(f"train.parallel fsdp: cannot find the decoder layers of {type(decoder).__name__} "
                               f"(expected a .layers list); use train.parallel ddp")
    return list(layers)


def wrap_for_training(ctx: DistContext, model: nn.Module, objective, method, parallel: str) -> nn.Module:
    """The module the loop calls for each micro-batch: LossForward alone (one process), under DDP, or sharded by
    FSDP2 (which shards `model`'s parameters in place: build the optimizer after this). Sets ctx.parallel and
    ctx.grad_reduce_divides_by (mutates ctx)."""
    forward = LossForward(model, objective, method)
    if not ctx.enabled:
        return forward
    if parallel == "fsdp":
        if method.name != "full":
            raise DistributedError(f"train.parallel fsdp shards full fine-tuning (method full); method "
                                   f"{method.name} trains few parameters: use train.parallel ddp")
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(method, model):
            fully_shard(layer)
        fully_shard(forward)  # the root: embeddings, final norm and head, gathered at each forward
        for unit in [*decoder_layers(method, model), forward]:
            unit.set_force_sum_reduction_for_comms(True)  # SUM on every backend (gloo's AVG sums: see above)
            unit.set_gradient_divide_factor(1.0)
        ctx.parallel, ctx.grad_reduce_divides_by = "fsdp", 1
        return forward
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffer broadcast before each forward: the buffers (rotary tables) are identical on every rank and never
    # change (torch 2.13 renamed broadcast_buffers to forward_sync_buffers).
    import inspect

    sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    ddp = DDP(forward, device_ids=device_ids, **{sync_kw: False})
    ctx.parallel, ctx.grad_reduce_divides_by = "ddp", ctx.world_size
    return ddp


def scaled_for_backward(ctx: DistContext, loss_sum: torch.Tensor, global_targets: float) -> torch.Tensor:
    """A micro-batch's summed loss x c / N (see the module docstring); for one process loss_sum * 1 / N, the
    single-process loss bit for bit."""
    return loss_sum * ctx.grad_reduce_divides_by / global_targets


def gradient_sync(forward: nn.Module, ctx: DistContext, sync: bool):
    """Context for one micro-batch's backward: reduce gradients across ranks only on the step's last one."""
    if ctx.parallel == "ddp" and not sync:
        return forward.no_sync()
    if ctx.parallel == "fsdp":
        forward.set_requires_gradient_sync(sync)  # recurses into the layer units
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """clip_grad_norm_ that also takes FSDP2's sharded (DTensor) gradients; returns the global norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full else norm)


def eval_scorer(forward: nn.Module, ctx: DistContext):
    """How evaluation computes (summed loss, targets) of a batch: under FSDP2 through the root module's forward
    (only it gathers the embeddings, final norm and head, and it must run before any layer does); None elsewhere
    (evaluate_loss's plain path)."""
    if ctx.parallel != "fsdp":
        return None
    return lambda batch: forward(batch, gold=True)
