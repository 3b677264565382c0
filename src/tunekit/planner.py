"""`tunekit plan`: predict the peak memory of a tunekit training run from the model's config alone.

The prediction models what the engine (engine/loop.py) actually holds at its peak, the end of a forward pass of
a micro-batch of step 2 (weights, adapter, optimizer state and every tensor saved for backward are alive):

    weights      base weights: fp32 as loaded; under bf16 the frozen nn.Linear weights are stored in bf16
                 (cast_frozen_linears_), the (tied) embedding stays fp32; QLoRA linears at 4.127 bits per weight
                 (NF4, block 64, double quantization); plus the bf16 copy of an fp32 head the loss keeps
    adapter      the trainable tensors the method adds (fp32); 0 for full / freeze / bitfit on existing biases
    gradients    fp32, one per trainable weight
    optimizer    AdamW: two fp32 states per trainable weight (8-bit AdamW: two uint8 states + block scales)
    activations  tensors autograd saves for backward, per decoder layer, counted from the architecture (hidden h,
                 MLP width i, query width a*d, key/value width k*d, tokens N = batch x mean sequence length with
                 packing); attention adds a*L^2 per sequence on CPU (tunekit's attention keeps the compute-dtype
                 probabilities), nothing quadratic on CUDA (SDPA keeps a log-sum-exp per row); no gradient
                 checkpointing; the loss gathers label positions and computes logits in ~32 MiB chunks
    allocator    CPU: the free memory malloc keeps (CPU_HEAP, the two measured constants per malloc: a share of
                 the saved activations and a multiple of the fp32 model as loaded; tcmalloc/jemalloc, which the
                 tunekit commands use when installed, or glibc's), less the optimizer state that fills it;
                 CUDA: 5% caching-allocator rounding
    overhead     CPU: the measured resident size of Python + torch + transformers + peft + the tokenizer and
                 data before the model loads; CUDA: 0 (the CUDA context is not counted by
                 torch.cuda.max_memory_allocated, which tunekit reports)

Every term but the CPU allocator's is a closed form in the config values (see `layer_saved_bytes`); tests check
them against hand computations and against the tensors autograd actually saves on tiny configs, and the README
compares predictions with peaks measured by real runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import OPTIMIZERS

MODEL_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"
PLAN_METHODS = ("lora", "qlora", "dora", "full", "freeze", "select", "ia3", "bitfit", "prefix", "prompt", "ptuning",
                "adapter")
QLORA_BITS = 4 + 8 / 64 + 32 / (256 * 64)  # NF4 + 8-bit block scales + fp32 scale per 256 scales = 4.127
LOSS_CHUNK_BYTES = 2**23 * 4  # engine/loss.py: chunks of 2**23 fp32 logits (32 MiB)
CPU_OVERHEAD = 400 * 2**20  # measured: RSS after importing tunekit/torch/transformers/peft + tokenizer + demo data


@dataclass(frozen=True)
class HeapFit:
    """CPU heap beyond the live tensors: `activations` x the saved activations (the temporaries each layer frees
    between its saved tensors) + `model` x the fp32 model's bytes as loaded (the fp32 weights freed when frozen
    linears are cast to bf16, quantized or packed, and the loading's own buffers); the optimizer state, allocated
    after the first forward pass, lands in that free memory first."""

    activations: float
    model: float


# Fitted per malloc (tunekit/allocator.py) on two runs of this machine (README, "Plan memory"): LoRA r16 on
# SmolLM2-135M, 4 and 8 sequences per micro-batch. tcmalloc on whole 20-step peaks (session 11; the 5 other runs
# of the table, full and QLoRA included, fall within 1% of it); jemalloc measured within 1% of tcmalloc on one run;
# glibc on 5-step peaks, and its peak keeps growing after them.
CPU_HEAP = {"tcmalloc": HeapFit(0.18, 2.1), "jemalloc": HeapFit(0.18, 2.1), "glibc": HeapFit(0.36, 1.75)}
CUDA_OVERHEAD_FRACTION = 0.05  # caching-allocator block rounding on top of live tensors
GiB = 2**30


class PlanError(ValueError):
    """Bad planner input; the message says what is valid."""


@dataclass
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    gated_mlp: bool = True  # Llama/Mistral/Qwen: gate, up, down; GPT-2/NeoX style: up, down
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = ""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        out = {"q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
               "o_proj": (self.q_width, h), "up_proj": (h, i), "down_proj": (i, h)}
        if self.gated_mlp:
            out["gate_proj"] = (h, i)
        return out

    def layer_linear_params(self) -> int:
        biases = {n: (self.attention_bias if n in ATTENTION else self.mlp_bias) for n in self.linears()}
        return sum(a * b + (b if biases[n] else 0) for n, (a, b) in self.linears().items())

    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_linear_params() + norms


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = {"all-linear": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}
NON_GATED = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi")
ALIASES = {"hidden_size": ("n_embd", "d_model"), "num_hidden_layers": ("n_layer", "num_layers"),
           "num_attention_heads": ("n_head",), "intermediate_size": ("n_inner", "ffn_dim")}


def _get(cfg: dict, key: str, source: str):
    for k in (key, *ALIASES.get(key, ())):
        if cfg.get(k) is not None:
            return cfg[k]
    raise PlanError(f"{source}: config has no {key!r} (nor {', '.join(ALIASES.get(key, ())) or 'an alias'}); is "
                    f"it a transformers causal-LM config.json?")


def shape_from_config(cfg: dict, source: str = "config") -> ModelShape:
    """ModelShape from a transformers config dict (multimodal configs: their text_config)."""
    cfg = cfg.get("text_config") or cfg
    h = _get(cfg, "hidden_size", source)
    heads = _get(cfg, "num_attention_heads", source)
    model_type = cfg.get("model_type", "")
    gated = model_type not in NON_GATED
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * h
    return ModelShape(
        name=cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or source, vocab=_get(cfg, "vocab_size", source),
        hidden=h, intermediate=inter, layers=_get(cfg, "num_hidden_layers", source), heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or h // heads,
        tied=bool(cfg.get("tie_word_embeddings", True)), gated_mlp=gated,
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        model_type=model_type,
    )


def presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESETS.glob("*.json"))


def config_path(ref: str) -> Path | None:
    """Where the config.json `ref` names should be: a folder's config.json, the file itself, or a preset under
    configs/models/; None when `ref` is none of those (existence of a folder's config.json is left to the caller)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path / "config.json"
    if path.exists():
        return path
    preset = MODEL_PRESETS / f"{ref}.json"
    return preset if preset.exists() else None


def load_shape(model: str) -> ModelShape:
    """`model`: a config.json, a model folder, a preset under configs/models/, or a packaged model alias (also after
    `random:`, the same shape with random weights: models.py)."""
    from .models import RANDOM_PREFIX

    shape_of = model[len(RANDOM_PREFIX):] if model.startswith(RANDOM_PREFIX) else model
    path = config_path(shape_of)
    if path is None:
        from .models import PACKAGED, resolve_model_path

        if shape_of not in PACKAGED:
            raise PlanError(f"model {model!r}: not a config.json, a model folder, a preset ({', '.join(presets())}) "
                            f"or a packaged model ({', '.join(PACKAGED)})")
        path = Path(resolve_model_path(shape_of)) / "config.json"
    if not path.exists():
        raise PlanError(f"{path} not found: give a config.json or a folder holding one")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    shape = shape_from_config(cfg, str(path))
    shape.name = model
    return shape


@dataclass
class MemoryPlan:
    model: str
    method: str
    device: str
    precision: str
    tokens_per_micro_batch: int
    trainable_params: int
    total_params: int
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    allocator: int  # CPU: heap holes beyond the live tensors; CUDA: the caching allocator's rounding
    overhead: int
    notes: list[str] = field(default_factory=list)
    malloc: str = ""  # CPU: the malloc planned for (tcmalloc, jemalloc, glibc)

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.allocator
                + self.overhead)

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("adapter", self.adapter), ("gradients", self.gradients),
                ("optimizer state", self.optimizer), ("activations", self.activations),
                ("allocator", self.allocator), ("framework overhead", self.overhead), ("total (peak)", self.total)]

    def table(self) -> str:
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        head = (f"{self.model} / {self.method} / {self.precision} on {self.device}: {self.trainable_params:,} "
                f"trainable of {self.total_params:,} ({pct:.3f}%), {self.tokens_per_micro_batch:,} tokens per "
                f"micro-batch" + (f", {self.malloc} malloc" if self.malloc else ""))
        lines = [head, f"{'term':<20} {'GiB':>9}"] + [f"{k:<20} {v / GiB:>9.3f}" for k, v in self.rows()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass
class Trainable:
    """What a method trains in one decoder layer, and outside the layers."""

    adapter_params: int = 0  # new tensors (LoRA A/B, IA3 vectors, new biases, bottlenecks, prompts)
    base_params: int = 0  # existing weights that train (full, freeze)
    lora_inputs: tuple[str, ...] = ()  # linears whose input a LoRA A (or a trained weight) saves
    lora_rank: int = 0
    full_layers: int = 0  # decoder layers whose weights all train (norm outputs, linear inputs saved)
    extra_per_token: int = 0  # bytes per token and layer a method keeps beyond that (IA3's scaled tensors)
    grad_layers: int = 0  # decoder layers the gradient flows through (all, unless freeze stops it)


def method_trainable(s: ModelShape, method: str, rank: int, target: str, virtual_tokens: int, bottleneck: int,
                     freeze_layers: int, compute_bytes: int = 2, fraction: float | None = 0.1,
                     max_params: int | None = None, select_rank: int | None = None) -> Trainable:
    lin = s.linears()
    targets = [t for t in TARGETS.get(target, ()) if t in lin]
    L = s.layers
    if method == "select":
        # The budget as methods/importance.budget_for counts it: a share of what training every (layer, module)
        # group would cost (its weights, or a LoRA of select_rank on it). Which groups win is unknown before
        # scoring, so the activations assume every group's input is kept: that is what the scoring pass holds
        # (all group weights take gradients there) and an upper bound for the training steps after it.
        cost = L * sum(select_rank * (lin[t][0] + lin[t][1]) if select_rank else lin[t][0] * lin[t][1]
                       for t in targets)
        budget = min(max_params, cost) if max_params else round((fraction or 0.1) * cost)
        if select_rank:
            return Trainable(adapter_params=budget, lora_inputs=tuple(targets), lora_rank=select_rank, grad_layers=L)
        return Trainable(base_params=budget, lora_inputs=tuple(targets), grad_layers=L)
    if method in ("lora", "qlora", "dora"):
        per_layer = sum(rank * (lin[t][0] + lin[t][1]) + (lin[t][1] if method == "dora" else 0) for t in targets)
        return Trainable(adapter_params=L * per_layer, lora_inputs=tuple(targets), lora_rank=rank, grad_layers=L)
    if method == "full":
        return Trainable(base_params=s.total_params(), lora_inputs=tuple(lin), full_layers=L, grad_layers=L)
    if method == "freeze":
        per_layer = s.layer_linear_params() + 2 * s.hidden
        return Trainable(base_params=freeze_layers * per_layer, lora_inputs=tuple(lin), full_layers=freeze_layers,
                         grad_layers=freeze_layers)
    if method == "ia3":  # peft's Llama defaults: k_proj, v_proj outputs, down_proj input
        return Trainable(adapter_params=L * (2 * s.kv_width + s.intermediate), grad_layers=L,
                         extra_per_token=compute_bytes * (2 * s.kv_width + s.intermediate))
    if method == "bitfit":
        return Trainable(adapter_params=L * sum(lin[t][1] for t in targets), grad_layers=L)
    if method == "adapter":  # houlsby: after attention and after the MLP
        return Trainable(adapter_params=L * 2 * (2 * s.hidden * bottleneck + bottleneck + s.hidden), grad_layers=L)
    if method == "prompt":
        return Trainable(adapter_params=virtual_tokens * s.hidden, grad_layers=L)
    if method == "ptuning":  # embeddings + peft's MLP encoder (h -> h -> h -> h)
        return Trainable(adapter_params=virtual_tokens * s.hidden + 3 * (s.hidden**2 + s.hidden), grad_layers=L)
    if method == "prefix":
        return Trainable(adapter_params=virtual_tokens * L * 2 * s.kv_width, grad_layers=L)
    raise PlanError(f"unknown method {method!r}; choose one of: {', '.join(PLAN_METHODS)}")


def layer_saved_bytes(s: ModelShape, tr: Trainable, tokens: int, seqs: int, seq_len: int, c: int, device: str,
                      full: bool, fused: bool = False, dropout: float = 0.0) -> int:
    """Bytes one decoder layer saves for backward. c: compute dtype bytes (2 bf16, 4 fp32).

    Always (the gradient passes through): the fp32 residual input of each RMSNorm (2 x 4h); RoPE's cos and sin
    (2 x c x d); the MLP's gate output, its activation and the up output (3 x c x i; 2 without a gate). On CPU
    tunekit's attention (attention.py) keeps the scaled query, the keys and the values of each sequence
    (c x (a*d + 2 k*d)) and its probabilities in the compute dtype (a x L^2 x c). On CUDA, SDPA keeps query, key/value at their widths, its output and a log-sum-exp per head and row.
    A trained weight (LoRA's A, or the weight itself) keeps its layer's input: under bf16 autocast every linear
    reading the fp32 norm output casts it anew (c x h per such linear); in fp32 they share the norm output (4h
    per block); o_proj and down_proj read compute-dtype tensors (c x a*d, c x i). LoRA adds A's output (c x r).
    Full training also keeps both norm outputs (2 x 4h) for the norm weights. `tr.extra_per_token` adds what
    other methods keep (IA3: the scaled k, v outputs and the down_proj input).
    With the fused CPU kernels (engine/fused_ops.py, `fused`) the norm output is one bf16 tensor the block's linears
    share (each LoRA layer still keeps its own copy when its input dropout is on), the MLP keeps gate and up only
    (silu is recomputed), and the norm's backward recomputes what full training kept of the norm output
    (measured per tensor against the eager path in tests/test_plan.py).
    """
    h, i, q, kv, d = s.hidden, s.intermediate, s.q_width, s.kv_width, s.head_dim
    n_mlp_out = (3 if s.gated_mlp else 2) - (1 if fused and s.gated_mlp else 0)
    per_token = 2 * 4 * h + 2 * c * d + n_mlp_out * c * i + tr.extra_per_token
    if device == "cpu":
        per_token += c * (q + 2 * kv)
        quadratic = seqs * s.heads * seq_len**2 * c
    else:
        per_token += c * (2 * q + 2 * kv) + 4 * s.heads
        quadratic = 0
    inputs = tr.lora_inputs
    if inputs:
        reads_norm = [t for t in inputs if t in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
        if c == 2 and not (fused and (dropout == 0.0 or not tr.lora_rank)):
            per_token += c * h * len(reads_norm)
        elif fused:
            per_token += c * h * len({t in ATTENTION for t in reads_norm})  # one shared bf16 norm output per block
        else:
            per_token += 4 * h * len({t in ATTENTION for t in reads_norm})  # one shared norm output per block
        if "o_proj" in inputs and device == "cpu":  # on CUDA SDPA's output is already counted
            per_token += c * q
        if "down_proj" in inputs:
            per_token += c * i
        per_token += c * tr.lora_rank * len(inputs)
    if full and not fused:
        per_token += 2 * 4 * h
    return tokens * per_token + quadratic


def plan(model: str = "smollm2-135m", method: str = "lora", seq_len: int = 512, batch: int = 8, rank: int = 16,
         target: str = "all-linear", precision: str = "bf16", device: str = "cpu", label_fraction: float = 0.5,
         virtual_tokens: int = 20, bottleneck: int = 64, freeze_layers: int = 1, fraction: float | None = 0.1,
         max_params: int | None = None, select_rank: int | None = None, malloc: str | None = None,
         optim: str = "adamw", dropout: float = 0.0, fused_ops: bool = True,
         packed_weights: bool = True, packed_weights_fp32: str = "auto") -> MemoryPlan:
    """Predicted peak memory of `tunekit train` for this model and method (see the module docstring). `malloc`
    (CPU): tcmalloc, jemalloc or glibc; default: the one a `tunekit train` started from here would use. `optim`:
    optim.name (config.OPTIMIZERS). `dropout`: the LoRA input dropout. `fused_ops`, `packed_weights`: the CPU bf16
    kernels of train.fused_ops / train.packed_weights (used where they apply: CPU, bf16, and for fused ops a model
    type engine/fused_ops.py handles and a C++ compiler, for packed weights a CPU with oneDNN's bf16 instructions);
    `packed_weights_fp32`: train.packed_weights_fp32, decided as the loop does (methods/packed_linear.py).
    `precision` auto: what `tunekit train` would pick on this machine (fp32 on a CPU without native bf16)."""
    if method not in PLAN_METHODS:
        raise PlanError(f"unknown method {method!r}; choose one of: {', '.join(PLAN_METHODS)}")
    if precision not in ("auto", "bf16", "fp32"):
        raise PlanError(f"precision {precision!r}: choose auto, bf16 or fp32")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"device {device!r}: choose cpu or cuda")
    precision, precision_note = _resolve_precision(precision, device)
    if optim not in OPTIMIZERS:
        raise PlanError(f"optim {optim!r}: choose one of {', '.join(OPTIMIZERS)}")
    if target not in TARGETS:
        raise PlanError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    for name, v in (("seq_len", seq_len), ("batch", batch), ("rank", rank), ("virtual_tokens", virtual_tokens),
                    ("bottleneck", bottleneck), ("freeze_layers", freeze_layers)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < label_fraction <= 1:
        raise PlanError(f"label_fraction {label_fraction!r}: the share of tokens with a loss, in (0, 1]")
    s = load_shape(model)
    if freeze_layers > s.layers:
        raise PlanError(f"freeze_layers {freeze_layers}: the model has {s.layers} layers")
    c = 2 if precision == "bf16" else 4
    tr = method_trainable(s, method, rank, target, virtual_tokens, bottleneck, freeze_layers, c, fraction,
                          max_params, select_rank)
    n_trainable = tr.adapter_params + tr.base_params
    notes: list[str] = [precision_note] if precision_note else []

    # --- weights ------------------------------------------------------------------------------------------------
    embed = s.vocab * s.hidden
    norms = (2 * s.layers + 1) * s.hidden
    linear = s.layers * s.layer_linear_params()
    trained_linear = linear if method == "full" else tr.base_params  # freeze: its layers stay fp32
    frozen_linear = linear - min(trained_linear, linear)
    frozen_bytes = (frozen_linear * QLORA_BITS / 8 if method == "qlora" else frozen_linear * (c if c == 2 else 4))
    cpu_bf16 = device == "cpu" and c == 2
    if packed_weights and cpu_bf16 and method != "qlora" and frozen_linear:
        packs, why = _packing_available()  # as the loop: not where this CPU lacks oneDNN's bf16 instructions
        if packs:
            frozen_bytes += 2 * 2 * frozen_linear  # oneDNN-packed W and W^T (methods/packed_linear.py)
            notes.append("packed_weights: two more bf16 copies of the frozen linear weights (oneDNN layout; "
                         "train.packed_weights false saves them, ~5% slower)")
        else:
            notes.append(f"packed_weights: not used here, no packed copies planned: {why}")
    if device == "cpu" and c == 4 and method != "qlora" and frozen_linear:
        packs, why = _fp32_packing(s, packed_weights_fp32)
        if packs:
            frozen_bytes += 2 * 4 * frozen_linear  # fp32 W and W^T in oneDNN's layout
            notes.append(f"packed_weights_fp32: two more fp32 copies of the frozen linear weights ({why})")
    fused = fused_ops and cpu_bf16 and _fused_ops_apply(s.model_type)
    head = 0 if s.tied else embed * (4 if method == "full" or c == 4 else 2)  # an untied frozen head is cast too
    weights = int(4 * embed + 4 * norms + 4 * min(trained_linear, linear) + frozen_bytes + head)
    if c == 2 and (s.tied or method == "full"):
        weights += 2 * embed  # the loss's cached bf16 copy of the fp32 head (engine/loss.py _compute_weight)
    if method == "dora":
        notes.append("dora: each forward also builds W + BA per adapted layer for the weight norm (one layer at a "
                     "time, not counted)")
    if method == "select":
        notes.append("select: the selected groups are known only after scoring; activations assume every group's "
                     "input is kept (the scoring pass), gradients and optimizer state the whole budget")
    if method == "qlora":
        notes.append(f"qlora: linear layers at {QLORA_BITS:.3f} bits per weight (NF4, block 64, double quant)")

    # --- trainable state ----------------------------------------------------------------------------------------
    adapter = 4 * tr.adapter_params
    gradients = 4 * n_trainable
    # AdamW: two fp32 moments; bitsandbytes 8-bit: two uint8 moments + an fp32 absmax per 2,048-value block
    optimizer = 8 * n_trainable if not optim.endswith("8bit") else int(2 * n_trainable * (1 + 4 / 2048))

    # --- activations --------------------------------------------------------------------------------------------
    prompt_like = method in ("prefix", "prompt", "ptuning")
    width = seq_len + (virtual_tokens if method in ("prompt", "ptuning") else 0)
    tokens = batch * width
    if prompt_like:
        notes.append(f"{method} trains on padded batches (no packing): {batch} rows of ~{width} tokens")
    full_layers = min(tr.full_layers, tr.grad_layers)
    saved = Trainable(lora_inputs=tr.lora_inputs, lora_rank=tr.lora_rank, extra_per_token=tr.extra_per_token)
    plain = saved if method in ("lora", "qlora", "dora", "select") else Trainable(extra_per_token=tr.extra_per_token)
    acts = (full_layers * layer_saved_bytes(s, saved, tokens, batch, width, c, device, True, fused, dropout)
            + (tr.grad_layers - full_layers) * layer_saved_bytes(s, plain, tokens, batch, width, c, device, False,
                                                                 fused, dropout))
    if c == 2:  # autocast's bf16 copies of trained fp32 matmul weights, kept for backward
        acts += 2 * (linear + (0 if s.tied else embed) if method == "full" else n_trainable)
    labels = int(tokens * label_fraction)
    # the final norm's fp32 input; the loss's (N_labels, h) gradient, in the norm output's dtype (bf16 when fused)
    acts += 4 * s.hidden * tokens + (c if fused else 4) * s.hidden * labels
    if method == "full":
        acts += 4 * s.hidden * tokens  # the final norm's output, for its trained weight
    if method not in ("full", "prompt", "ptuning"):
        acts -= 4 * s.hidden * tokens  # the embedding output needs no gradient: layer 0 keeps no copy of it
    acts += min(labels * s.vocab * 4, LOSS_CHUNK_BYTES) * (1 + 2 * c / 4)  # one logits chunk, fp32 + two copies
    if method == "full":
        acts += 4 * embed  # the head's gradient is made in the loss's forward pass
    if device == "cpu":
        from .allocator import planned

        malloc = malloc or planned()
        if malloc not in CPU_HEAP:  # another system malloc (musl, macOS): glibc's figure, unmeasured
            notes.append(f"malloc {malloc}: no measured factor, planned as glibc")
        elif malloc == "glibc":
            notes.append("glibc malloc: the peak keeps growing after the first steps (measured +17% by step 20, "
                         "+27..41% by step 40); tcmalloc (apt install libtcmalloc-minimal4) keeps it flat")
        overhead = CPU_OVERHEAD
        fit = CPU_HEAP.get(malloc, CPU_HEAP["glibc"])
        allocator = max(0, int(fit.activations * acts + fit.model * 4 * s.total_params()) - optimizer)
    else:
        malloc = ""
        overhead = 0  # the CUDA context (~0.5 GiB) is outside torch.cuda.max_memory_allocated
        allocator = int(CUDA_OVERHEAD_FRACTION * (weights + acts))
    return MemoryPlan(model=s.name, method=method, device=device, precision=precision, tokens_per_micro_batch=tokens,
                      trainable_params=n_trainable, total_params=s.total_params() + tr.adapter_params,
                      weights=weights, adapter=adapter, gradients=gradients, optimizer=optimizer,
                      activations=int(acts), allocator=allocator, overhead=overhead, notes=notes, malloc=malloc)


def _resolve_precision(precision: str, device: str) -> tuple[str, str | None]:
    """precision auto as `tunekit train` resolves it (engine/device.py: bf16 where the device computes it
    natively), and a note when that is not bf16 or cannot be asked here."""
    if precision != "auto":
        return precision, None
    import torch

    from .engine.device import resolve_precision

    if device == "cuda" and not torch.cuda.is_available():
        return "bf16", "precision auto: planned as bf16 (no GPU here to ask; pass --precision fp32 for one without)"
    resolved = resolve_precision("auto", torch.device(device))
    why = "no native bf16 matmul on this " + ("CPU: neither avx512_bf16 nor amx_bf16" if device == "cpu" else "GPU")
    return resolved, None if resolved == "bf16" else f"precision auto: {resolved} ({why})"


def _packing_available() -> tuple[bool, str]:
    """Whether the loop's packed frozen weights (train.packed_weights) can be used on this CPU, and if not, why."""
    import torch

    from .methods.packed_linear import available

    return available(torch.device("cpu"))


def _fp32_packing(s: ModelShape, mode: str) -> tuple[bool, str]:
    """Whether the loop packs fp32 frozen weights for this model (train.packed_weights_fp32), and why."""
    from .methods.packed_linear import decide_fp32_packing

    shapes: dict[tuple[int, int], int] = {}
    for n_in, n_out in s.linears().values():
        shapes[(n_out, n_in)] = shapes.get((n_out, n_in), 0) + s.layers
    return decide_fp32_packing(shapes, mode)


def _fused_ops_apply(model_type: str) -> bool:
    """Whether the training loop's fused CPU kernels (train.fused_ops auto) switch this model type under bf16."""
    import torch

    from .engine.fused_ops import applies

    return applies(torch.device("cpu"), "bf16", model_type, compiled_layers=False)[0]


def free_memory_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can get now: MemAvailable on Linux, free CUDA memory; None when unknown."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    from .engine.device import proc_kib_field

    return proc_kib_field("/proc/meminfo", "MemAvailable")


def plan_for_run(cfg, mean_length: float, label_fraction: float, device: str, precision: str = "bf16",
                 malloc: str | None = None) -> MemoryPlan:
    """The plan of a training Config on data with `mean_length` tokens per example (the loop's own numbers)."""
    from .models import resolve_model_path

    m = cfg.method
    method = "dora" if m.name == "lora" and getattr(m, "dora", False) else m.name
    target = getattr(m, "target_modules", "all-linear")
    layers = load_shape(resolve_model_path(cfg.model.name)).layers
    freeze_layers = layers if m.name == "full" else 1
    if m.name == "freeze":  # layer selections like layers.28-29 count their layers; anything else counts as one
        import re

        spans = [re.search(r"(-?\d+)(?:-(\d+))?", t) for t in m.trainable]
        freeze_layers = max(1, sum(int(x[2]) - int(x[1]) + 1 if x and x[2] else 1 for x in spans))
    return plan(resolve_model_path(cfg.model.name), method=method, seq_len=max(1, round(mean_length)),
                batch=cfg.train.batch_size, rank=getattr(m, "r", 16),
                target=target if isinstance(target, str) else "all-linear",
                precision=precision, device=device,
                label_fraction=min(1.0, max(label_fraction, 1e-3)),
                virtual_tokens=getattr(m, "num_virtual_tokens", 20), bottleneck=getattr(m, "bottleneck", 64),
                freeze_layers=min(freeze_layers, layers), fraction=getattr(m, "fraction", None),
                max_params=getattr(m, "max_params", None), select_rank=getattr(m, "lora_r", None), malloc=malloc,
                optim=cfg.optim.name, dropout=getattr(m, "dropout", 0.0) or 0.0,
                fused_ops=cfg.train.fused_ops != "off" and cfg.train.compile != "on",
                packed_weights=cfg.train.packed_weights and cfg.train.compile != "on",
                packed_weights_fp32=cfg.train.packed_weights_fp32 if cfg.train.compile != "on" else "off")


def mean_example_length(stats) -> float:
    """Mean tokens per example of prepared data (DataStats)."""
    return stats.total_tokens / max(stats.n_train + stats.n_val, 1)


def student_plan(cfg, stats, device, precision: str, malloc: str | None = None) -> MemoryPlan:
    """The plan of the run `cfg` on its prepared data, for a torch device and the loop's resolved precision."""
    return plan_for_run(cfg, mean_example_length(stats), stats.label_tokens / stats.total_tokens,
                        "cuda" if device.type == "cuda" else "cpu",
                        precision if precision in ("bf16", "fp32") else "fp32", malloc)


def run_plan(cfg, stats, device, precision: str) -> MemoryPlan | None:
    """The plan of this run on its prepared data, or None when it cannot be made (no data, a hub model not
    downloaded yet, an architecture the planner does not read)."""
    if not stats.n_train or not stats.total_tokens:
        return None
    try:
        return student_plan(cfg, stats, device, precision)
    except (OSError, ValueError):  # PlanError is a ValueError
        return None


def over_free_memory_warning(p: MemoryPlan | None, device) -> str | None:
    """One warning line when plan `p` exceeds the free memory of `device` (None if it fits or is unknown)."""
    free = free_memory_bytes(str(device)) if p is not None else None
    if free is None or p.total <= free:
        return None
    return (f"[tunekit] warning: the memory plan of this run is {p.total / GiB:.2f} GiB but only {free / GiB:.2f} "
            f"GiB is free on {device}; lower train.batch_size or data.max_length, or use qlora (tunekit plan "
            f"shows the terms; train.plan_check false silences this)")


def teacher_bytes(teacher: str, precision: str, tokens: int) -> int:
    """Memory a frozen teacher adds to a distillation run: its weights (the whole model in bf16 under bf16
    precision, else fp32) plus the transient activations of one no-grad forward pass over `tokens` tokens
    (about two layers' worth of hidden and MLP tensors are alive at once, and the (N, H) final hidden states)."""
    from .models import resolve_model_path

    s = load_shape(resolve_model_path(teacher))
    width = 2 if precision == "bf16" else 4
    transient = tokens * (4 * s.hidden + 3 * s.intermediate + s.q_width + 2 * s.kv_width) * 4 * 2
    return s.total_params() * width + transient


def check_teacher_fits(cfg, stats, device, precision: str) -> None:
    """Raise PlanError before loading anything heavy when student plan + teacher exceed the free memory."""
    if not stats.n_train or not stats.total_tokens:
        return
    try:
        student = student_plan(cfg, stats, device, precision).total
        teacher = teacher_bytes(cfg.distill.teacher, precision,
                                round(mean_example_length(stats) * cfg.train.batch_size))
    except (OSError, ValueError) as e:  # a hub teacher not downloaded yet: nothing to plan from
        print(f"[tunekit] memory plan skipped: {e}", flush=True)
        return
    free = free_memory_bytes(str(device))
    if free is not None and student + teacher > free:
        raise PlanError(
            f"distillation needs about {(student + teacher) / GiB:.2f} GiB (student run {student / GiB:.2f} GiB + "
            f"teacher {cfg.distill.teacher} {teacher / GiB:.2f} GiB) but only {free / GiB:.2f} GiB is free on "
            f"{device}. Use train.precision bf16 (halves the teacher), a smaller train.batch_size, or "
            f"distill.mode offline (the teacher generates first and is unloaded before training); "
            f"train.plan_check false skips this check.")
