"""`tunekit merge`: fold a trained adapter into the base weights and write a plain transformers model folder.

    run folder (adapter) + base model -> method.load -> method.merge -> save_pretrained (safetensors) + tokenizer

The result loads with `AutoModelForCausalLM.from_pretrained` and runs with zero adapter overhead. What can merge:
LoRA (also rsLoRA, DoRA, PiSSA/OLoRA, which are saved as plain LoRA), IA3 (the scales multiply into the weights),
BitFit (the biases become nn.Linear biases), freeze and full (already plain weights). A QLoRA adapter was trained on
the 4-bit base, so it is merged into that base dequantized to fp32 (the function the run trained), never into
4-bit weights; the command says so. Prefix, prompt and p-tuning add virtual tokens and bottleneck adapters add a
nonlinearity: none of them is a weight update, so they cannot merge (a MethodError says how to serve them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import DTYPES, ModelError

MERGE_INFO = "tunekit_merge.json"


@dataclass
class MergeResult:
    out_dir: str
    method: str
    base_model: str
    dtype: str
    note: str  # what was merged into what, in words


def base_model_of(run_dir: Path) -> str:
    """The base model a run folder was trained on: config.yaml's model.name, else PEFT's base_model_name_or_path."""
    import yaml

    run_config = run_dir / "config.yaml"
    if run_config.exists():
        name = ((yaml.safe_load(run_config.read_text()) or {}).get("model") or {}).get("name")
        if name:
            return name
    adapter_config = run_dir / "adapter_config.json"
    if adapter_config.exists():
        name = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if name:
            return name
    raise ModelError(f"{run_dir}: cannot tell which base model it was trained on (no config.yaml with model.name); "
                     f"pass --model")


def merge(adapter: str, out: str, model: str | None = None, dtype: str = "float32", device: str = "cpu",
          quiet: bool = False) -> MergeResult:
    """Merge the run folder / adapter at `adapter` into its base model (`model`, default: the one it was trained
    on) and write a plain transformers folder to `out` with weights in `dtype` (float32, bfloat16, float16)."""
    from .models import load_tokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    run_dir, out_dir = Path(adapter), Path(out)
    if out_dir.resolve() == run_dir.resolve():
        raise ModelError(f"--out {out_dir} is the run folder itself; choose a new folder")
    merged, method, model_name, tokenizer_ref = load_merged(adapter, model, device)
    merged = merged.to(DTYPES[dtype])
    note = merge_note(method.name, dtype, low_rank=getattr(getattr(method, "cfg", None), "lora_r", None) is not None)
    if not quiet:
        print(f"[tunekit] {note}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = merged.config
    config.dtype = DTYPES[dtype]
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(tokenizer_ref).save_pretrained(out_dir)
    result = MergeResult(str(out_dir), method.name, model_name, dtype, note)
    (out_dir / MERGE_INFO).write_text(json.dumps({**asdict(result), "adapter": str(run_dir)}, indent=2) + "\n")
    return result


def load_merged(adapter: str, model: str | None = None, device: str = "cpu"):
    """(merged fp32 model, method, base model name, tokenizer reference) for a run folder / adapter: the base
    loaded in fp32, the adapter applied by its method and folded in (W + BA rounded once, in fp32)."""
    from .inference import tokenizer_source
    from .methods import MethodError, method_for_folder
    from .models import load_model

    run_dir = Path(adapter)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {run_dir}")
    method = method_for_folder(run_dir)
    if not method.can_merge:
        method.merge(None)  # raises the method's own MethodError: why it cannot merge, how to serve it instead
        raise MethodError(f"method {method.name!r} cannot be merged into the base weights")
    model_name = model or base_model_of(run_dir)
    base = load_model(model_name, dtype="float32", device=device)
    merged = method.merge(method.load(base, run_dir))
    return merged, method, model_name, tokenizer_source(model_name, str(run_dir))


def merge_note(method: str, dtype: str, low_rank: bool = False) -> str:
    """What merging did, in one line; low_rank: a select run that trained LoRA on its modules (lora_r)."""
    if method == "qlora":
        return (f"qlora: merged the adapter into the 4-bit base dequantized to fp32 (what the run trained on), "
                f"saved as {dtype}; the result is not 4-bit and not the original unquantized base")
    if method in ("full", "freeze") or (method == "select" and not low_rank):
        return f"{method}: the trained weights already form a plain model; saved as {dtype}"
    return f"{method}: folded into the base weights, saved as {dtype}"

