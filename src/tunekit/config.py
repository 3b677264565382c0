"""Typed configuration for a tunekit run.

One source of truth: every field's description is the `--help` text, `--print-config` shows every effective
value, YAML files and `--section.key value` flags fill the same models, and unknown keys are rejected with
the valid ones listed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="Base model: 'smollm2-135m' (the packaged default, works offline), a local transformers "
        "folder, a .gguf file, or a hub id (needs network).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of the base weights. Compute precision is train.precision."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model folder. Off by default.")
    attn_implementation: Literal["tunekit_sdpa", "sdpa", "eager", "flash_attention_2"] = Field(
        "tunekit_sdpa",
        description="Attention kernel. tunekit_sdpa runs SDPA per packed sequence (no T x T mask); sdpa/eager use "
        "transformers' block-diagonal mask for packed rows; flash_attention_2 needs the flash-attn package.",
    )


class DataConfig(Section):
    train: str | None = Field(None, description="Training data: .jsonl/.json/.csv/.parquet file, or a HF dataset name.")
    validation: str | None = Field(None, description="Validation file. If unset, val_fraction of train is held out.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of train held out when no validation file.")
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text"] = Field(
        "auto", description="Record format; 'auto' detects messages / prompt+completion / instruction+output / text."
    )
    train_on: Literal["completion", "all"] = Field(
        "completion", description="Take the loss on assistant/completion tokens only, or on all tokens."
    )
    max_length: int = Field(1024, ge=8, description="Maximum tokens per example.")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="What to do with examples over max_length.")
    system_prompt: str | None = Field(None, description="System message added to chat examples that have none.")
    packing: bool = Field(
        True, description="Pack each micro-batch into one row without padding; sequences never attend to each other."
    )
    split: str = Field("train", description="Split name for HF datasets.")
    seed: int = Field(0, description="Seed of the train/validation split.")


METHOD_NAMES = ("lora", "full", "qlora", "prefix", "prompt", "ptuning", "ia3", "adapter", "bitfit", "freeze",
                "select")
METHOD_HELP = f"Fine-tuning method: {', '.join(METHOD_NAMES)}."
TargetModules = Union[list[str], Literal["all-linear", "attention", "mlp"]]
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")  # and pissa_niter_<n>


class LoraMethod(Section):
    name: Literal["lora"] = Field("lora", description=METHOD_HELP)
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or a preset: all-linear, attention, mlp.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r.")
    dora: bool = Field(False, description="DoRA: a trainable magnitude per output row on top of the LoRA direction.")
    init: str = Field(
        "default",
        description="LoRA init: default (A kaiming-uniform, B zero), gaussian (A normal, B zero), orthogonal, pissa, "
        "pissa_niter_<n> (fast SVD), olora. pissa/olora move the top singular/QR part of W into A, B.",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-module ranks overriding r, e.g. {down_proj: 8, layers.0.self_attn.q_proj: 32} (keys match "
        "module-name suffixes, as in peft).",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alphas overriding alpha, keyed like rank_pattern."
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", v):
            raise ValueError(f"unknown LoRA init {v!r}; choose one of: {', '.join(LORA_INITS)}, pissa_niter_<n>")
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _positive_pattern_values(cls, v: dict) -> dict:
        bad = {k: x for k, x in v.items() if x <= 0}
        if bad:
            raise ValueError(f"ranks and alphas must be positive; got {bad}")
        return v


class QLoraMethod(LoraMethod):
    name: Literal["qlora"] = Field("qlora", description=METHOD_HELP)  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base linear layers: nf4 (QLoRA's NormalFloat) or fp4."
    )
    double_quant: bool = Field(
        True, description="Quantize the per-block scales too (8-bit, ~0.127 instead of 0.5 extra bits per weight)."
    )
    compute_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantized to for each matmul."
    )
    block_size: Literal[32, 64, 128, 256] = Field(64, description="Weights per quantization block (one scale each).")


class FullMethod(Section):
    name: Literal["full"] = Field("full", description=METHOD_HELP)
    freeze_embeddings: bool = Field(False, description="Keep the token embeddings (and a tied lm_head) frozen.")


class PrefixMethod(Section):
    name: Literal["prefix"] = Field("prefix", description=METHOD_HELP)
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable key/value positions prepended in every layer.")
    projection: bool = Field(
        False, description="Reparameterise the prefix through a 2-layer MLP while training (Li & Liang 2021)."
    )
    projection_hidden: int | None = Field(
        None, ge=1, description="Hidden size of that MLP (default: the model's key/value width)."
    )


class PromptMethod(Section):
    name: Literal["prompt"] = Field("prompt", description=METHOD_HELP)
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable embeddings prepended to every input.")
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="Initial prompt: random vectors, embeddings of random vocabulary tokens, or of init_text."
    )
    init_text: str | None = Field(
        None, description="Text whose token embeddings start the prompt (repeated/cut to num_virtual_tokens)."
    )

    @model_validator(mode="after")
    def _text_init_needs_text(self) -> "PromptMethod":
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init: text and init_text go together: set both, or neither")
        return self


class PTuningMethod(Section):
    name: Literal["ptuning"] = Field("ptuning", description=METHOD_HELP)
    num_virtual_tokens: int = Field(20, ge=1, description="Virtual token embeddings prepended to every input.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder that produces them while training.")
    encoder_hidden: int | None = Field(
        None, ge=1, description="Encoder hidden size (default: the model's hidden size)."
    )
    encoder_layers: int = Field(2, ge=1, description="LSTM layers (the MLP encoder always has 3 linear layers).")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside the LSTM encoder.")


class IA3Method(Section):
    name: Literal["ia3"] = Field("ia3", description=METHOD_HELP)
    target_modules: TargetModules = Field(
        ["k_proj", "v_proj", "down_proj"],
        description="Linear layers whose activations get a learned scale (IA3 paper: keys, values, MLP down).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Targets scaled on their input instead of their output (default: the MLP ones among targets).",
    )


class AdapterMethod(Section):
    name: Literal["adapter"] = Field("adapter", description=METHOD_HELP)
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and after the MLP of every layer; pfeiffer: after the MLP."
    )
    bottleneck: int = Field(64, ge=1, description="Adapter bottleneck width (down-projection size).")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Nonlinearity between down and up.")


class BitFitMethod(Section):
    name: Literal["bitfit"] = Field("bitfit", description=METHOD_HELP)
    target_modules: TargetModules = Field(
        "all-linear",
        description="Linear layers whose bias trains; a zero bias is added where the model has none (Llama).",
    )


class FreezeMethod(Section):
    name: Literal["freeze"] = Field("freeze", description=METHOD_HELP)
    trainable: list[str] = Field(
        ["layers.-1"],
        description="What trains: layer indices (layers.3, layers.28-29, layers.-1 = last) or dotted name patterns "
        "with globs (mlp, self_attn.*_proj, layers.0.mlp, norm); everything else is frozen.",
    )
    train_embeddings: bool = Field(False, description="Also train the token embeddings (and a tied lm_head).")


class SelectMethod(Section):
    """Parameter selection ("core vs task-specific parameters"): score every (decoder layer, linear module) group on
    a sample of the training data, train the best ones within a parameter budget, freeze the rest."""

    name: Literal["select"] = Field("select", description=METHOD_HELP)
    strategy: Literal["importance", "random", "last"] = Field(
        "importance",
        description="How groups are chosen within the budget: importance (highest score first), random (seeded "
        "shuffle; a baseline) or last (from the last decoder layer down; the last-N-layers baseline).",
    )
    importance: Literal["fisher", "grad"] = Field(
        "fisher",
        description="Score of a group g over scoring micro-batches b with gradients G_b of the micro-batch's mean "
        "token loss: fisher = mean_b sum_{i in g} G_b[i]^2 (empirical Fisher diagonal), grad = mean_b sum_{i in g} "
        "|G_b[i]|; then divided by the group's size under normalize: mean.",
    )
    score_batches: int = Field(
        8, ge=0, description="Training micro-batches (train.batch_size examples each, seeded) the scores are "
        "computed on; 0 skips scoring (allowed for the random and last strategies only).",
    )
    normalize: Literal["mean", "sum"] = Field(
        "mean",
        description="mean: score per parameter (sum / group size), so a large MLP matrix does not win by size alone "
        "and the budget buys the most importance per trained parameter; sum: the group's total.",
    )
    fraction: float | None = Field(
        0.1, gt=0, le=1, description="Budget: this share of the parameters training all groups would cost "
        "(full rank: their weights; with lora_r: LoRA on all of them). Give fraction or max_params, not both.",
    )
    max_params: int | None = Field(
        None, ge=1, validate_default=True,
        description="Budget as a number of trainable parameters (setting it alone clears fraction).",
    )
    modules: TargetModules = Field(
        "all-linear", description="Linear module types that form groups, one group per decoder layer and type: "
        "leaf names (e.g. [q_proj, down_proj]) or all-linear, attention, mlp.",
    )
    lora_r: int | None = Field(
        None, ge=1, description="null: the selected groups train at full rank; a rank: LoRA of that rank on the "
        "selected modules only (saved as a plain PEFT adapter).",
    )
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator with lora_r (scale = lora_alpha / r).")
    seed: int = Field(0, description="Seed of the random strategy's shuffle.")

    @model_validator(mode="before")
    @classmethod
    def _max_params_replaces_fraction(cls, data: Any) -> Any:
        # `max_params: N` alone means that budget; the default fraction must not also apply.
        if isinstance(data, dict) and data.get("max_params") is not None and "fraction" not in data:
            data = {**data, "fraction": None}
        return data

    # Field validators run in field order, so each sees the fields above it: the error names its own key.
    @field_validator("score_batches")
    @classmethod
    def _scores_when_needed(cls, v: int, info) -> int:
        if v < 1 and info.data.get("strategy") == "importance":
            raise ValueError("strategy importance needs score_batches >= 1 (its scores come from training batches)")
        return v

    @field_validator("max_params")
    @classmethod
    def _exactly_one_budget(cls, v: int | None, info) -> int | None:
        if (v is None) == (info.data.get("fraction") is None) and "fraction" in info.data:
            raise ValueError("give exactly one budget: fraction (a share, e.g. 0.1) or max_params (a count of "
                             "trainable parameters), and set the other to null")
        return v


MethodConfig = Annotated[
    Union[LoraMethod, FullMethod, QLoraMethod, PrefixMethod, PromptMethod, PTuningMethod, IA3Method, AdapterMethod,
          BitFitMethod, FreezeMethod, SelectMethod],
    Field(discriminator="name"),
]
METHODS: dict[str, type[Section]] = {
    "lora": LoraMethod, "full": FullMethod, "qlora": QLoraMethod, "prefix": PrefixMethod, "prompt": PromptMethod,
    "ptuning": PTuningMethod, "ia3": IA3Method, "adapter": AdapterMethod, "bitfit": BitFitMethod,
    "freeze": FreezeMethod, "select": SelectMethod,
}
assert tuple(METHODS) == METHOD_NAMES


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


class OptimConfig(Section):
    name: Literal[OPTIMIZERS] = Field(
        "adamw", description="Optimizer: torch's fused AdamW (fp32 states), or bitsandbytes' AdamW with 8-bit "
        "block-quantized states (adamw_8bit: 2 instead of 8 bytes per trainable weight; CPU and CUDA) and its "
        "paged variants (CUDA only: states page to CPU memory under GPU memory pressure).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of the peak.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm; null disables.")


class TrainConfig(Section):
    output_dir: str = Field("runs/latest", description="Run folder: checkpoints, adapter, metrics, run card.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; if unset, `epochs` decides.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (used when max_steps is unset).")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (loss is token-weighted).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute precision: bf16 autocast where the device supports it (auto), or fp32."
    )
    seed: int = Field(0, description="Seed for weights init, dropout and data order.")
    eval_every: int = Field(50, ge=0, description="Evaluate validation loss every N steps (0: only at the end).")
    save_every: int = Field(50, ge=0, description="Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Append metrics every N steps.")
    resume: bool = Field(False, description="Continue from the last checkpoint in output_dir.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the decoder layers (fuses the element-wise work; the first steps compile, "
        "~1 min on 2 CPU cores, cached on disk; lower peak memory, and +7% tokens/s on CPU over eager peft LoRA). "
        "auto: for runs of 300+ steps when a compiler is available and the method allows it, except LoRA with "
        "fused_lora on (the eager fused branch measured faster: 462 vs 444 tokens/s).")
    fused_lora: bool = Field(
        True, description="Run the adapter branch of peft LoRA layers as one autograd node with a cheaper dropout "
        "mask (methods/lora_kernel.py; same parameters and saved adapter; +9% tokens/s measured on CPU). false: "
        "peft's own forward.")
    fused_ops: Literal["auto", "on", "off"] = Field(
        "auto", description="CPU bf16: RMSNorm, SiLU x up and RoPE each as one Inductor-compiled kernel computing in "
        "fp32 and writing bf16 once (engine/fused_ops.py; 1.10x tokens/s in the benchmark; ~25 s to compile on a "
        "cold cache, ~3 s after). auto: when a C++ compiler is there and the model is Llama, Mistral, Qwen2 or Qwen3; on: "
        "error where it cannot be used.")
    packed_weights: bool = Field(
        True, description="CPU bf16: keep frozen linear weights, and their transposes, in oneDNN's blocked layout "
        "(methods/packed_linear.py; 1.09x tokens/s in the benchmark, costs two more bf16 copies of the frozen linear "
        "weights).")
    packed_weights_fp32: Literal["auto", "on", "off"] = Field(
        "auto", description="CPU fp32 (no native bf16): frozen linear weights in oneDNN's blocked layout too, where "
        "F.linear would go to MKL (slow on AMD's AVX2 path). auto: on CPUs without native bf16, where a start-up "
        "A/B on the model's shapes finds it >= 1.1x faster (decided once per machine, cached in ~/.cache/tunekit); "
        "costs two fp32 copies of the frozen linear weights.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several processes (tunekit train --nproc N, or torchrun -m tunekit.cli train): ddp = "
        "every process holds the model, gradients are all-reduced (gloo on CPU, nccl on GPU); fsdp = FSDP2 "
        "(fully_shard) shards parameters, gradients and optimizer state per decoder layer (method full only). "
        "batch_size x grad_accum stays the global batch, split evenly across the processes (docs/scale-out.md).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Extra metric sinks (their libraries must be installed)."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    plan_check: bool = Field(
        True, description="Make the memory plan of the run (tunekit plan; kept in result.json and the run card next "
                          "to the measured peak) and warn before training when it exceeds the free memory."
    )
    pii: Literal["off", "warn", "refuse", "redact"] = Field(
        "warn", description="Scan data.train / data.validation for personal data (e-mail, IBAN, card, phone, IP, "
        "names; tunekit data scan) before training: warn prints what was found (masked, with file:line:field); refuse "
        "stops with that report; redact trains on a copy with typed placeholders (<output_dir>/pii-redacted/); off "
        "skips the scan (docs/privacy.md).")

    @field_validator("pii", mode="before")
    @classmethod
    def _pii_yaml_boolean(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads `off` as false

    @field_validator("compile", "fused_ops", mode="before")
    @classmethod
    def _compile_yaml_booleans(cls, v: Any) -> Any:
        # YAML reads `on`/`off` (and true/false) as booleans: accept them as the words they are.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
    energy: bool = Field(True, description="Measure (RAPL/NVML) or estimate the run's energy and CO2e with codecarbon, "
                         "offline; shown in the run card.")
    country_iso_code: str = Field("DEU", description="3-letter ISO code of the grid whose carbon intensity converts "
                                  "kWh to CO2e (codecarbon's table).")


class DistillConfig(Section):
    """Teacher -> student distillation (tunekit distill). The student is `model` trained with `method`."""

    mode: Literal["offline", "logit", "on-policy"] = Field(
        "logit", description="offline: the teacher writes responses for the training prompts, the student does SFT "
        "on them; logit: alpha*CE + (1-alpha)*T^2*D(teacher||student) on the label tokens; on-policy: the student "
        "samples completions and learns the teacher's distribution on exactly those tokens.")
    teacher: str | None = Field(None, description="Teacher model (alias, folder, .gguf or hub id); needs the "
                                "student's tokenizer for logit/on-policy.")
    teacher_adapter: str | None = Field(None, description="Run folder or PEFT adapter attached to the teacher "
                                        "(merged into its weights once).")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the cross-entropy on the gold labels; the KD term "
                         "gets 1 - alpha (logit mode and the off-policy batches of on-policy mode).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of both models in the KD term "
                               "(scaled by T^2 so its gradients keep their size).")
    divergence: Literal["auto", "forward_kl", "reverse_kl", "jsd"] = Field(
        "auto", description="D: forward KL(teacher||student) (mode covering), reverse KL(student||teacher) (mode "
        "seeking), or generalized JSD(beta). auto: forward_kl for logit, reverse_kl for on-policy.")
    kd_on: Literal["completion", "all"] = Field(
        "completion", description="Positions of the KD term on gold batches: completion = the labelled tokens; all = "
        "every token, prompt included (the teacher's distribution is known there too), scaled to count as many "
        "tokens as the labels; the CE term stays on the labels.")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD(beta) = beta*KL(T||M) + (1-beta)*KL(S||M), "
                        "M = beta*T + (1-beta)*S (Agarwal et al. 2023).")
    on_policy_fraction: float = Field(1.0, ge=0, le=1, description="on-policy: share of micro-batches the student "
                                      "samples (lambda in GKD); the rest train on the gold data as in logit mode.")
    on_policy_warmup_steps: int = Field(0, ge=0, description="on-policy: the first N optimizer steps train on gold "
                                        "micro-batches only (as in logit mode) before the student starts sampling.")
    on_policy_loss: Literal["full", "sampled"] = Field(
        "full", description="on-policy: full = D over the whole vocabulary at each sampled position (GKD); sampled = "
        "per-token reverse KL log p_s(x) - log p_t(x) of the sampled tokens only, as a policy-gradient "
        "(on-policy distillation as in Thinking Machines 2025).")
    sample_temperature: float = Field(1.0, gt=0, description="Temperature of the student's samples (on-policy).")
    max_new_tokens: int = Field(128, ge=1, description="Longest completion the student (on-policy) or the teacher "
                                "(offline) generates.")
    teacher_data: str | None = Field(None, description="offline: JSONL the teacher's responses go to (resumable); "
                                     "default <output_dir>/teacher_data.jsonl.")
    generate_batch_size: int = Field(16, ge=1, description="offline: prompts per teacher generation batch.")
    teacher_temperature: float = Field(0.0, ge=0, description="offline: teacher sampling temperature (0 = greedy).")


class Config(Section):
    """Everything one training run needs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=LoraMethod)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig | None = Field(None, description="Distil a teacher into this run's model (tunekit distill).")

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, v: Any) -> Any:
        # `method: lora` is shorthand for `method: {name: lora}`.
        if isinstance(v, str):
            v = {"name": v}
        if isinstance(v, dict):
            v = {"name": "lora", **v}
            name = v["name"]
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
            allowed = set(METHODS[name].model_fields)
            extra = sorted(set(v) - allowed)
            if extra:
                raise ValueError(
                    f"option(s) {', '.join(extra)} do not belong to method {name!r}; "
                    f"its options are: {', '.join(sorted(allowed))}"
                )
        return v


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the key and the valid choices."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in METHODS and len(e["loc"]) > 1))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _section_for(e["loc"][:-1])
            valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
            msg = f"unknown key; valid keys here: {valid}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def section_type(ann: Any) -> type[BaseModel] | None:
    """The config section class of a field annotation: `X` or `X | None` (an optional section like distill)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    inner = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
        return inner[0]
    return None


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if part in METHODS:
            return METHODS[part]
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        model = section_type(field.annotation)
        if model is None:
            return None
    return model


def parse_value(text: str) -> Any:
    """Parse a flag value as YAML (so `3`, `1e-4`, `true`, `[q_proj, v_proj]` and `null` work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `tree['a']['b'] = value` for key 'a.b' (mutates `tree`)."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {} if node.get(p) is None or p != "method" else {"name": node[p]}
        node = node[p]
    node[parts[-1]] = value


def flatten_dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the inverse of set_dotted, for overrides and metric trackers."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from an optional YAML file plus dotted overrides like {'method.r': 8}."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping with keys {', '.join(Config.model_fields)}")
        tree = loaded
        source = str(path)
    for key, value in (overrides or {}).items():
        if isinstance(tree.get("method"), str) and key.startswith("method."):
            tree["method"] = {"name": tree["method"]}
        set_dotted(tree, key, value)
    if overrides:
        source += " + flags"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: the CLI help table."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = section_type(field.annotation)
        if section is not None:
            rows += describe_fields(section, key + ".")
        elif name == "method" and model is Config:
            rows.append(("method.name", repr("lora"), METHOD_HELP))
            # One row per option; an option several methods share with the same meaning and default is listed once.
            owners: dict[tuple[str, str, str], list[str]] = {}
            for mname, mcls in METHODS.items():
                for row in describe_fields(mcls, "method."):
                    if row[0] != "method.name":
                        owners.setdefault(row, []).append(mname)
            rows += [(k, d, f"({', '.join(names)} only) {desc}") for (k, d, desc), names in owners.items()]
        else:
            default = field.default_factory() if field.default_factory else field.default
            rows.append((key, repr(default), field.description or ""))
    return rows
