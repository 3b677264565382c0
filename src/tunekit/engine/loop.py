"""The training loop: one readable function, top to bottom.

    config -> tokenizer + data -> base model -> method.apply -> optimizer/schedule -> (resume) ->
    for each optimizer step: grad_accum micro-batches, token-weighted loss, clip, step -> eval / checkpoint
    -> save result + run card

Numeric pieces live in small modules (batching, loss, schedule, checkpoint), each tested once.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from ..config import Config, config_to_yaml
from ..data import prepare_data
from ..allocator import in_use
from ..methods import build_method, cast_frozen_linears_, count_parameters, trainable_named_parameters
from ..methods.lora_kernel import use_fast_lora_
from ..methods.packed_linear import decide_fp32_packing, pack_frozen_linears_
from ..models import load_model, load_tokenizer
from .batching import BatchStream, eval_batches
from .checkpoint import TrainingState, latest_checkpoint, rng_state, set_rng_state
from .compile import compile_decoder_layers_, layers_compiled
from .fused_ops import fuse_decoder_ops_
from .energy import EnergyMeter
from .flops import (ModelShape, base_linear_weights, cached_matmul_peak, cached_shape_peak, flops_per_token,
                    linear_shapes, peak_dtype)
from .device import (autocast, keep_freed_memory, peak_memory_bytes, pick_device, precision_reason,
                     reset_peak_memory, resolve_precision)
from .objective import build_objective, gold_loss_sum
from .metrics import MetricsLog, NullLog, Progress, Sinks, read_metrics
from .schedule import build_optimizer, build_scheduler
from ..distributed.context import DistContext, init_distributed, peer_failure_is_clear, shutdown_distributed
from ..distributed.sharding import check_world_divides, rank_micro_batches
from ..distributed.state import load_checkpoint_any_world, save_checkpoint_once, save_result_once
from ..distributed.wrap import clip_grad_norm, eval_scorer, gradient_sync, scaled_for_backward, wrap_for_training


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    tokens_seen: int
    tokens_per_s: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    trainable_params: int
    total_params: int
    peak_memory_bytes: int
    wall_time_s: float
    precision: str
    device: str
    interrupted: bool = False
    precision_note: str = ""  # why this precision (engine/device.py precision_reason)
    mfu: float | None = None  # model FLOPs utilisation against the measured matmul peak (engine/flops.py)
    flops_per_token: float | None = None
    matmul_peak_flops: float | None = None
    mfu_model_shapes: float | None = None  # against the rate of the model's own linear shapes (flops.py)
    shape_peak_flops: float | None = None
    energy: dict | None = None  # engine/energy.py EnergyReport, or None with energy_note saying why
    energy_note: str = ""
    planned_peak_bytes: int | None = None  # planner.py's prediction for this run (None when it cannot plan it)
    allocator: str = ""  # the malloc serving CPU memory: tcmalloc, jemalloc, glibc (tunekit/allocator.py)
    world_size: int = 1  # training processes (torchrun); tokens and tokens/s count all of them
    parallel: str = "none"  # none, ddp or fsdp (distributed/wrap.py)


ETA_AFTER_STEPS = 4  # steps (the first, warm-up one included) before the loop says how long the run will take


class _StopFlag:
    """First Ctrl-C asks the loop to finish the current step and checkpoint; a second one aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[tunekit] interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
              flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def evaluate_loss(model, method, examples, batch_size: int, packing: bool, pad_id: int, device, precision,
                  score=None) -> float:
    """Mean loss per target token over `examples` (token-weighted across batches). `score(batch)` -> (summed
    loss, targets) replaces gold_loss_sum (FSDP2 evaluates through its root module: distributed/wrap.py)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        head = method.lm_head(model)
        score = score or (lambda b: gold_loss_sum(model, method, head, b))
        for batch in eval_batches(examples, batch_size, packing, pad_id):
            loss_sum, n = score(batch.to(device))
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)


def micro_batch_loss(model, batch, method, device, precision) -> tuple[torch.Tensor, int]:
    """(summed label loss, targets) of one micro-batch, the forward of a training step (for Method.prepare)."""
    with autocast(device, precision):
        return gold_loss_sum(model, method, method.lm_head(model), batch.to(device))


def total_steps_for(cfg: Config, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


def train(cfg: Config) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.method`; everything lands in `cfg.train.output_dir`.

    Under torchrun (WORLD_SIZE > 1) each process runs this same function on its share of every global batch
    (distributed/); alone, it is the plain single-process run."""
    check_world_divides(cfg.train.batch_size, cfg.train.grad_accum, int(os.environ.get("WORLD_SIZE", 1)))
    ctx = init_distributed(pick_device(cfg.train.device))
    try:
        return _train(cfg, ctx)
    finally:
        shutdown_distributed(ctx)


def _train(cfg: Config, ctx: DistContext) -> TrainResult:
    t_start = time.perf_counter()
    tc = cfg.train
    run_dir = Path(tc.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    device = ctx.device
    if device.type == "cpu":
        keep_freed_memory()
    precision = resolve_precision(tc.precision, device)
    precision_note = precision_reason(tc.precision, precision, device)
    reset_peak_memory(device)

    # Data first: bad input fails before the model is loaded.
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, tokenizer)
    pad_id = tokenizer.pad_token_id
    from ..planner import over_free_memory_warning, run_plan

    # The plan is kept in the result next to the measured peak.
    memory_plan = run_plan(cfg, data.stats, device, precision) if tc.plan_check else None
    warning = over_free_memory_warning(memory_plan, device)
    if warning:
        ctx.say(warning)

    # The objective before the student: a teacher that cannot be used (tokenizer, memory) fails before training.
    objective = build_objective(cfg, tokenizer, data.stats, device, precision)
    model = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    method = build_method(cfg.method)
    linear_weights = base_linear_weights(model)  # before the method adds layers of its own (for MFU)
    # A method may look at a seeded sample of the training data first (select scores parameter groups on it).
    sample = BatchStream(data.train, tc.batch_size, tc.seed, cfg.data.packing and method.supports_packing, pad_id)
    method.prepare(model, sample, partial(micro_batch_loss, method=method, device=device, precision=precision), device)
    model = method.apply(model).to(device)
    if precision == "bf16":
        cast_frozen_linears_(model, torch.bfloat16)  # same matmuls as autocast, without per-step weight casts
    # LoRA layers (if any): the adapter branch as one node, cheaper dropout
    n_fused = use_fast_lora_(model) if tc.fused_lora else 0
    n_trainable, n_total = count_parameters(model)
    steps = total_steps_for(cfg, len(data.train))
    lm = method.causal_lm(model)
    compile_note = compile_decoder_layers_(lm, tc.compile, device,
                                           method.supports_compile and objective.supports_compile, steps, n_fused)
    # CPU bf16 kernels: element-wise work fused by Inductor, frozen weights in oneDNN's layout (not with compiled
    # layers, which fuse and lay out on their own).
    compiled = layers_compiled(lm)
    fused_note = fuse_decoder_ops_(lm, tc.fused_ops, device, precision, compiled)
    # On a CPU without oneDNN's bf16 instructions pack_frozen_linears_ packs nothing and logs why.
    n_packed, packed_note = 0, ""
    if device.type == "cpu" and not compiled and precision == "bf16" and tc.packed_weights:
        n_packed = pack_frozen_linears_(model)
    elif device.type == "cpu" and not compiled and precision == "fp32" and method.name != "qlora":
        # fp32 products go to MKL, whose AVX2 path is slow on AMD: oneDNN's packed product where it measures faster
        pack_fp32, packed_note = decide_fp32_packing(linear_shapes(linear_weights), tc.packed_weights_fp32)
        if pack_fp32:
            head = lm.get_output_embeddings()
            n_packed = pack_frozen_linears_(model, torch.float32,
                                            skip=frozenset({id(head.weight)} if head is not None else ()))
    # MFU = tokens/s x model FLOPs per token / this machine's measured matmul peak (engine/flops.py).
    n_tok = sum(len(ex.input_ids) for ex in data.train)
    n_lab = sum(sum(1 for x in ex.labels[1:] if x != -100) for ex in data.train)
    flops_tok = flops_per_token(ModelShape.from_model(model, linear_weights), n_lab / max(n_tok, 1),
                                n_tok / max(len(data.train), 1))
    peak = cached_matmul_peak(peak_dtype(precision, device), device)
    # and against the rate of the model's own linear shapes (the progress line shows this one: engine/flops.py)
    shape_peak = cached_shape_peak(linear_shapes(linear_weights), peak_dtype(precision, device), device)
    # DDP around the training forward, or FSDP2 sharding the model in place: before the optimizer sees the params.
    forward = wrap_for_training(ctx, model, objective, method, tc.parallel)
    params = trainable_named_parameters(model)
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    packing = cfg.data.packing and method.supports_packing
    if cfg.data.packing and not packing:
        ctx.say(f"[tunekit] method {method.name} cannot train on packed rows: using padded batches")
    stream = BatchStream(data.train, tc.batch_size, tc.seed, packing, pad_id)
    eval_args = (tc.batch_size, packing, pad_id, device, precision)

    def validation_loss() -> float:  # every rank evaluates the whole validation set (FSDP2 needs all of them)
        return evaluate_loss(model, method, data.validation, *eval_args, score=eval_scorer(forward, ctx))

    start_step, tokens_seen, eval_before, earlier = 0, 0, None, TrainingState(0, {}, {}, 0, {})
    ckpt = latest_checkpoint(run_dir) if tc.resume else None
    if ckpt is not None:
        state = load_checkpoint_any_world(ctx, ckpt, model, optimizer)
        scheduler.load_state_dict(state.scheduler)
        stream.load_state_dict(state.stream)
        set_rng_state(state.rng)
        start_step, tokens_seen, earlier = state.step, state.tokens_seen, state
        # Metrics, run card and result come from rank 0 (NullLog elsewhere).
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step) if ctx.is_main else NullLog()
        eval_before = next((m["eval_loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] == 0
                            and "eval_loss" in m), None) if ctx.is_main else None
        ctx.say(f"[tunekit] resumed from {ckpt} at step {start_step}/{steps}")
    else:
        if tc.resume:
            ctx.say(f"[tunekit] --resume: no checkpoint in {run_dir}/checkpoints, starting from step 0")
        log = MetricsLog(run_dir / "metrics.jsonl") if ctx.is_main else NullLog()
        eval_before = validation_loss() if data.validation else None
        log.write({"step": 0, "eval_loss": eval_before})
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    sinks = Sinks(tc.report_to if ctx.is_main else [], run_dir, cfg.model_dump(mode="json"))
    ctx.say(f"[tunekit] {data.stats.summary()}")
    ctx.say(f"[tunekit] {method.name}: {n_trainable:,} trainable of {n_total:,} parameters "
            f"({100 * n_trainable / n_total:.3f}%), {steps} steps on {device}; {compile_note}; {fused_note}"
            + (f"; {n_packed} frozen linears packed for oneDNN" if n_packed else "")
            + (f" ({packed_note})" if packed_note and n_packed else f"; fp32 weights not packed: {packed_note}"
               if packed_note else "")
            + (f"; {ctx.world_size} processes ({ctx.parallel}, {ctx.backend})" if ctx.enabled else ""))
    ctx.say(f"[tunekit] precision {precision_note}")

    progress = Progress(steps, start_step, tc.progress and ctx.is_main)
    energy = EnergyMeter(tc.energy, tc.country_iso_code)
    energy.start()
    model.train()
    # Throughput and wall time continue those of the processes that ran earlier parts of a resumed run.
    step, rate_tokens, rate_time = start_step, earlier.rate_tokens, earlier.rate_time
    eval_after, interrupted = None, False

    def checkpoint():  # one writer (rank 0); with FSDP2 every rank helps gather first
        elapsed = earlier.elapsed_s + time.perf_counter() - t_start
        save_checkpoint_once(ctx, run_dir, model, optimizer,
                             TrainingState(step, stream.state_dict(), scheduler.state_dict(), tokens_seen, rng_state(),
                                           elapsed, rate_tokens, rate_time), keep=tc.keep_checkpoints)

    def resume_hint() -> str:
        return (f"The last complete checkpoint is {latest_checkpoint(run_dir)}; continue with: tunekit train "
                f"--config {run_dir}/config.yaml --resume --nproc N (any N that divides the global batch)")

    with _StopFlag() as stop, peer_failure_is_clear(ctx, resume_hint):
        while step < steps:
            t0 = time.perf_counter()
            # This rank's share of the global batch (all of it for one process), as micro-batches.
            micro = [objective.prepare(b, model, method, step)
                     for b in rank_micro_batches(stream, tc.batch_size, tc.grad_accum, ctx.rank, ctx.world_size)]
            # Token-weighted loss: every target token of the optimizer step weighs the same, however the step is
            # split into micro-batches and ranks (divide by the global batch's total, not a micro-batch's or rank's).
            n_targets, n_tokens = ctx.sum([sum(b.n_targets for b in micro), sum(b.n_tokens for b in micro)])
            loss_total, part_totals = 0.0, {}
            for i, batch in enumerate(micro):
                b = batch.to(device)
                with gradient_sync(forward, ctx, sync=i == len(micro) - 1):  # reduce once per step
                    with autocast(device, precision):
                        loss_sum, parts = forward(b)
                    scaled_for_backward(ctx, loss_sum, n_targets).backward()
                loss_total += float(loss_sum.detach())
                for k, v in parts.items():
                    part_totals[k] = part_totals.get(k, 0.0) + v
            # Summed over ranks for the log; the stop request too, so that every rank leaves the loop together.
            totals = ctx.sum([loss_total, float(stop.requested), *part_totals.values()])
            loss_total, stop_requested, part_totals = totals[0], totals[1] > 0, dict(zip(part_totals, totals[2:]))
            grad_norm = None
            if cfg.optim.max_grad_norm:
                grad_norm = clip_grad_norm(params.values(), cfg.optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_tokens = int(n_tokens)
            tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            if step > start_step + 1 or steps - start_step == 1:  # first step pays one-off warm-up costs
                rate_tokens, rate_time = rate_tokens + n_tokens, rate_time + dt
            loss = loss_total / n_targets
            record = {"step": step, "loss": loss, "lr": lr, "tokens": n_tokens, "tokens_seen": tokens_seen,
                      "tokens_per_s": n_tokens / dt, "grad_norm": grad_norm,
                      # Peak so far (RSS on CPU, allocated on CUDA): shows when in a run memory grows.
                      "peak_memory_gib": peak_memory_bytes(device) / 2**30,
                      **{f"loss_{k}": v / n_targets for k, v in part_totals.items()}}
            if tc.eval_every and step % tc.eval_every == 0 and step < steps and data.validation:
                record["eval_loss"] = validation_loss()
                progress.message(f"step {step}: eval_loss {record['eval_loss']:.4f}")
            if step % tc.log_every == 0 or "eval_loss" in record or step == steps:
                log.write(record)
                sinks.log(record, step)
            progress.update(step, loss, n_tokens / dt, lr, mfu=n_tokens / dt * flops_tok / shape_peak,
                            peak_gib=record["peak_memory_gib"])
            if step == start_step + ETA_AFTER_STEPS and steps - step > 0 and rate_time:
                # Said once the warm-up step is behind: what this machine does, and what the run will take.
                progress.message(f"[tunekit] this machine trains at ~{rate_tokens / rate_time:,.0f} tokens/s "
                                 f"({precision}): the remaining {steps - step} steps take ~"
                                 f"{(steps - step) * tokens_seen / step * rate_time / rate_tokens / 60:.1f} min")
            if stop_requested:
                interrupted = True
                break
            if tc.save_every and step % tc.save_every == 0 and step < steps:
                checkpoint()
        if step == steps and data.validation:
            eval_after = validation_loss()
            log.write({"step": step, "eval_loss": eval_after, "final": True})
        checkpoint()
    progress.close()
    log.close()
    energy_report = energy.stop()

    result = TrainResult(
        run_dir=str(run_dir), steps=step, tokens_seen=tokens_seen,
        tokens_per_s=rate_tokens / rate_time if rate_time else 0.0,
        eval_loss_before=eval_before, eval_loss_after=eval_after,
        trainable_params=n_trainable, total_params=n_total, peak_memory_bytes=peak_memory_bytes(device),
        wall_time_s=earlier.elapsed_s + time.perf_counter() - t_start, precision=precision, device=str(device),
        interrupted=interrupted, precision_note=precision_note,
        mfu=(rate_tokens / rate_time * flops_tok / peak) if rate_time else None, flops_per_token=flops_tok,
        matmul_peak_flops=peak, shape_peak_flops=shape_peak,
        mfu_model_shapes=(rate_tokens / rate_time * flops_tok / shape_peak) if rate_time else None,
        energy=energy_report.as_dict() if energy_report else None, energy_note=energy.reason,
        planned_peak_bytes=memory_plan.total if memory_plan else None, allocator=in_use(),
        world_size=ctx.world_size, parallel=ctx.parallel,
    )
    if interrupted:
        ctx.say(f"[tunekit] stopped at step {step}; continue with: tunekit train --config {run_dir}/config.yaml "
                f"--train.resume true")
        return result
    save_result_once(ctx, method, model, run_dir)
    if not ctx.is_main:
        return result
    tokenizer.save_pretrained(run_dir)
    from ..runcard import write_run_card

    write_run_card(run_dir, cfg, result, data.stats, method, extra_rows=objective.report())
    (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    return result
