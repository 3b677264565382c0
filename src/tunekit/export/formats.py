"""The five export formats. Each writer fills a temporary folder and returns the card's fields.

hf, gguf, ollama: the merged model (any method whose update folds into the weights). lora-gguf, vllm: the LoRA
adapter alone (the LoRA family, no DoRA). What a format cannot take is refused with the reason and the formats
that do work, before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ExportError

ADAPTER_FORMATS = ("lora-gguf", "vllm")
MERGED_FORMATS = ("hf", "gguf", "ollama")
# vLLM accepts these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks, vLLM 0.32.0).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------------------------------------- helpers
def _merged(source: Path, model: str | None):
    from ..merging import load_merged
    from ..methods import MethodError
    from ..models import load_tokenizer

    try:
        merged, method, base, tokenizer_ref = load_merged(str(source), model)
    except MethodError as e:
        raise ExportError(f"{source}: {e} Formats that take it: none of {', '.join(MERGED_FORMATS)} (they need a "
                          f"weight update); serve it with `tunekit serve`, which runs it in its own batch") from e
    merged.eval()
    return merged, method, base, load_tokenizer(tokenizer_ref)


def _base_card(source: Path, fmt: str, method, base: str, what: str) -> dict:
    return {"format": fmt, "source": str(source), "method": method.name, "base_model": base, "what": what,
            "verification": {}}


def _source_gguf(base: str) -> Path | None:
    """The GGUF a converted base model came from (models.convert_gguf records it), if any."""
    from ..models import resolve_model_path

    try:
        record = Path(resolve_model_path(base)) / "tunekit_source.json"
    except Exception:
        return None
    if record.exists():
        path = Path(json.loads(record.read_text()).get("gguf", ""))
        return path if path.exists() else None
    return None


def end_of_turn_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn tokens the vocabulary has: what generation must stop at."""
    from .gguf_file import END_OF_TURN

    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
    return ids


def _check(condition: bool, what: str, result) -> None:
    if not condition:
        raise ExportError(f"verification failed: {what} ({result}); nothing was written")


# --------------------------------------------------------------------------------------------------------------- hf
def export_hf(source: Path, tmp: Path, *, quant, model, dtype, verify, threads, **_) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import DTYPES
    from .verify import compare_logits

    if quant:
        raise ExportError("--quant applies to gguf/ollama/lora-gguf; the hf format takes --dtype "
                          f"({', '.join(DTYPES)})")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    merged, method, base, tokenizer = _merged(source, model)
    stored = merged.to(DTYPES[dtype])
    stored.config.dtype = DTYPES[dtype]
    eot = end_of_turn_ids(tokenizer)
    gen = stored.generation_config
    gen.eos_token_id = eot if len(eot) > 1 else (eot[0] if eot else None)
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.pad_token_id
    stored.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    card = _base_card(source, "hf", method, base, f"merged model, {dtype} safetensors, tokenizer + chat template, "
                      f"generation stops at ids {eot}")
    card["use"] = [f"AutoModelForCausalLM.from_pretrained('{'<out>'}')", "tunekit serve --model <out>"]
    if verify:
        if threads:
            torch.set_num_threads(threads)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        merged = merged.float()
        check = compare_logits(merged, reloaded, tokenizer)
        tolerance = 1e-4 if dtype == "float32" else 0.5
        _check(check.max_abs_diff <= tolerance and check.top1_agreement >= (1.0 if dtype == "float32" else 0.95),
               f"reloaded {dtype} logits vs the fp32 merge", check)
        again = AutoTokenizer.from_pretrained(tmp)
        from .verify import PROBE_CHATS, prompt_ids

        same = sum(prompt_ids(again, c) == prompt_ids(tokenizer, c) for c in PROBE_CHATS)
        _check(same == len(PROBE_CHATS), "chat template after reload", f"{same}/{len(PROBE_CHATS)}")
        card["verification"]["transformers reload"] = {**check.as_dict(), "tolerance": tolerance,
                                                       "chat_template_identical": same}
    return card


# ------------------------------------------------------------------------------------------------------------- gguf
def export_gguf(source: Path, tmp: Path, *, quant, model, verify, gguf_pre, threads, **_) -> dict:
    quant = quant or "f16"
    merged, method, base, tokenizer = _merged(source, model)
    path, card = _write_gguf(source, tmp, merged, method, base, tokenizer, quant, gguf_pre)
    if verify:
        _verify_gguf(card, tmp, path, merged, tokenizer, quant, threads)
    return card


def _write_gguf(source, tmp, merged, method, base, tokenizer, quant, gguf_pre, stem: str | None = None):
    from .gguf_file import GGUFExportError, tokenizer_info, write_model_gguf
    from .quants import QuantError, check_quant

    try:
        check_quant(quant)
        tok = tokenizer_info(tokenizer, merged.config.vocab_size, pre=gguf_pre, source_gguf=_source_gguf(base))
        path = tmp / f"{stem or source.resolve().name}-{quant}.gguf"
        types = write_model_gguf(path, merged.state_dict(), merged.config, tok, quant, name=source.resolve().name)
    except (GGUFExportError, QuantError) as e:
        raise ExportError(str(e)) from e
    mix: dict[str, int] = {}
    for t in types.values():
        mix[t] = mix.get(t, 0) + 1
    card = _base_card(source, "gguf", method, base, f"merged model as GGUF {quant} (tensor types: "
                      f"{', '.join(f'{k} x{v}' for k, v in sorted(mix.items()))}), tokenizer and chat template inside")
    card.update(quant=quant, tensor_types=mix, gguf=path.name, tokenizer_pre=tok.pre, eos_token_id=tok.eos)
    card["use"] = [f"llama-cli -m {path.name}", f"llama-server -m {path.name} --jinja"]
    return path, card


# f16/bf16/f32 must match PyTorch almost everywhere; quantized files are measured and reported, with a floor that
# catches a broken file (wrong row order, wrong tokenizer), not quantization error.
LLAMACPP_FLOOR = {"f32": 0.99, "f16": 0.99, "bf16": 0.97, "q8_0": 0.9}


def _verify_gguf(card, tmp, path, merged, tokenizer, quant, threads) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .llamacpp import available
    from .verify import compare_llamacpp, compare_logits

    if threads:
        torch.set_num_threads(threads)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=path.name, dtype=torch.float32).eval()
    check = compare_logits(merged, loaded, tokenizer)
    del loaded
    floor = LLAMACPP_FLOOR.get(quant, 0.5)
    _check(check.top1_agreement >= floor, "transformers reading the GGUF (dequantized) vs the fp32 merge", check)
    card["verification"]["transformers gguf_file"] = check.as_dict()
    if not available():
        card["verification"]["llama.cpp"] = {"skipped": "xllamacpp not installed (pip install xllamacpp)"}
        return
    lc = compare_llamacpp(str(path), merged, tokenizer, threads=threads)
    _check(lc.top1_agreement >= floor, f"llama.cpp greedy tokens vs PyTorch argmax (floor {floor})", lc)
    _check(lc.chat_template_identical == lc.prompts, "llama.cpp's chat template tokens vs ours", lc)
    card["verification"]["llama.cpp"] = {**lc.as_dict(), "floor": floor}


# ----------------------------------------------------------------------------------------------------------- ollama
def export_ollama(source: Path, tmp: Path, *, quant, model, verify, gguf_pre, threads, **_) -> dict:
    import gguf as gguf_py

    from ..models import cache_dir
    from .ollama import TemplateError, check_template, go_binary, go_template, modelfile, wrappers

    quant = quant or "q8_0"
    merged, method, base, tokenizer = _merged(source, model)
    if not tokenizer.chat_template:
        raise ExportError(f"{source}: the tokenizer has no chat template, so there is no TEMPLATE to write")

    def render(messages, gen, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)

    try:
        w = wrappers(render, tokenizer.bos_token)
    except TemplateError as e:
        raise ExportError(f"{source}: the chat template has no Ollama TEMPLATE equivalent tunekit can write: {e}; "
                          f"use --format gguf (llama.cpp applies the Jinja template itself with --jinja)") from e
    template = go_template(w)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    path, card = _write_gguf(source, tmp, merged, method, base, tokenizer, quant, gguf_pre)
    (tmp / "Modelfile").write_text(modelfile(path.name, template, stops, w.default_system))
    card.update(format="ollama", stops=stops, default_system=w.default_system)
    card["what"] = f"{card['what']}; Modelfile with a Go TEMPLATE, stop {stops}" + (
        ", SYSTEM" if w.default_system else "")
    card["use"] = [f"cd <out> && ollama create {source.resolve().name} -f Modelfile",
                   f"ollama run {source.resolve().name}"]
    if verify:
        # Every stop string must be one token of the GGUF's vocabulary, and its eos id the tokenizer's.
        reader = gguf_py.GGUFReader(path)
        vocab = reader.fields["tokenizer.ggml.tokens"].contents()
        eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
        missing = [s for s in stops if s not in vocab]
        _check(not missing and vocab[eos] == tokenizer.eos_token, "stop strings / eos in the GGUF vocabulary",
               f"missing {missing}, eos {eos}={vocab[eos]!r}")
        try:
            result = check_template(template, w.default_system, render, go_binary(cache_dir() / "go"))
        except FileNotFoundError as e:
            result = {"skipped": str(e)}
        except TemplateError as e:
            raise ExportError(f"verification failed: {e}; nothing was written") from e
        card["verification"]["Go text/template vs Jinja"] = result
        card["verification"]["stops in GGUF vocabulary"] = {"stops": len(stops), "eos_token_id": int(eos)}
        _verify_gguf(card, tmp, path, merged, tokenizer, quant, threads)
    return card


# -------------------------------------------------------------------------------------------------------- lora-gguf
def _adapter_config(source: Path, fmt: str, method) -> dict:
    path = source / "adapter_config.json"
    if method.name in ("full", "freeze", "select") or not path.exists():
        raise ExportError(f"{source}: a {method.name} run has no LoRA adapter to export as {fmt}; "
                          f"export the model with --format hf, gguf or ollama")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ExportError(f"{source}: {cfg.get('peft_type')} adapters cannot be exported as {fmt} (LoRA only); "
                          f"formats that work: {', '.join(MERGED_FORMATS)} (merged)")
    if cfg.get("use_dora"):
        raise ExportError(f"{source}: DoRA's magnitude vector is not a LoRA product, so {fmt} cannot carry it; "
                          f"export it merged with --format hf, gguf or ollama")
    return cfg


def _module_shapes(config) -> dict[str, tuple[int, int]]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def export_lora_gguf(source: Path, tmp: Path, *, quant, model, verify, gguf_pre, threads, **_) -> dict:
    import gguf
    import torch

    from ..merging import base_model_of
    from ..methods import method_for_folder
    from ..models import load_model, load_tokenizer
    from ..serve.adapters import AdapterError, read_lora
    from .gguf_file import ARCHS, REORDER_QK, arch_of, gguf_name, reorder_qk

    method = method_for_folder(source)
    cfg = _adapter_config(source, "lora-gguf", method)
    base = model or base_model_of(source)
    base_model = load_model(base, dtype="float32").eval()
    config = base_model.config
    arch_of(config)
    try:
        lora = read_lora(source.name, source, _module_shapes(config), config.num_hidden_layers, torch.float32)
    except AdapterError as e:
        raise ExportError(f"{e} (llama.cpp LoRA GGUFs carry decoder-linear LoRA factors only)") from e
    # llama.cpp scales each tensor pair by adapter.lora.alpha / rank (rank: the tensor's own); read_lora folded
    # tunekit's exact per-module scale (alpha or alpha_pattern, / r or / sqrt(r)) into B, so B is divided by the
    # scale llama.cpp will apply: the product is the trained one for plain LoRA, rsLoRA and per-module ranks alike.
    alpha = float(cfg.get("lora_alpha") or 1.0)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    path = tmp / "adapter.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCHS[config.model_type]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{source.resolve().name} (LoRA)")
    for (layer, module), (a, b) in sorted(lora.factors.items()):
        part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        name = gguf_name(f"model.layers.{layer}.{part}.{module}.weight", config)
        b = b.float().numpy() * (a.shape[0] / alpha)
        if config.model_type in REORDER_QK and module in ("q_proj", "k_proj"):
            b = reorder_qk(b, heads if module == "q_proj" else kv)
        writer.add_tensor(f"{name}.lora_a", a.float().numpy().astype("float32"))
        writer.add_tensor(f"{name}.lora_b", b.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = load_tokenizer(str(source) if (source / "tokenizer_config.json").exists() else base)
    base_quant = quant or "f16"
    base_path, _ = _write_gguf(source, tmp, base_model, method, base, tokenizer, base_quant, gguf_pre, stem="base")
    card = _base_card(source, "lora-gguf", method, base,
                      f"LoRA adapter as a llama.cpp LoRA GGUF ({len(lora.factors)} tensor pairs, ranks "
                      f"{lora.info['ranks']}, alpha {alpha:g}, scale folded per tensor), with the base as "
                      f"{base_path.name} (what the adapter was checked against)")
    card.update(adapter=path.name, base_gguf=base_path.name, ranks=lora.info["ranks"])
    card["use"] = [f"llama-cli -m {base_path.name} --lora adapter.gguf",
                   f"llama-server -m {base_path.name} --lora adapter.gguf"]
    if verify:
        from .llamacpp import available
        from .verify import compare_llamacpp

        if not available():
            card["verification"]["llama.cpp"] = {"skipped": "xllamacpp not installed (pip install xllamacpp)"}
            return card
        if threads:
            torch.set_num_threads(threads)
        merged, _, _, _ = _merged(source, model)
        with_lora = compare_llamacpp(str(base_path), merged, tokenizer, lora=str(path), threads=threads)
        without = compare_llamacpp(str(base_path), merged, tokenizer, threads=threads)
        floor = LLAMACPP_FLOOR.get(base_quant, 0.5)
        _check(with_lora.top1_agreement >= floor, "llama.cpp base + LoRA GGUF vs the PyTorch merge", with_lora)
        card["verification"]["llama.cpp base + adapter.gguf vs PyTorch merge"] = with_lora.as_dict()
        card["verification"]["llama.cpp base alone vs PyTorch merge (control)"] = without.as_dict()
    return card


# ------------------------------------------------------------------------------------------------------------- vllm
def vllm_problems(cfg: dict) -> list[str]:
    """What vLLM's PEFT checks (vllm/lora/peft_helper.py, vLLM 0.32.0) would refuse in this adapter_config."""
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if cfg.get("lora_bias"):
        problems.append("LoRA bias (lora_bias)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (vLLM takes bias='none')")
    if [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        problems.append(f"modules_to_save {cfg.get('modules_to_save')}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights={init!r} (changes the base weights)")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if cfg.get(key):
            problems.append(key)
    ranks = [cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {max(ranks)} > {VLLM_MAX_LORA_RANKS[-1]}, vLLM's largest --max-lora-rank")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if any(t in ("lm_head", "embed_tokens") for t in targets):
        problems.append("LoRA on lm_head / embed_tokens")
    return problems


def export_vllm(source: Path, tmp: Path, *, model, verify, serve_name, quant, **_) -> dict:
    from ..merging import base_model_of
    from ..methods import method_for_folder
    from ..models import resolve_model_path

    if quant:
        raise ExportError("--quant does not apply to --format vllm (vLLM loads the adapter in the base's dtype)")
    method = method_for_folder(source)
    cfg = _adapter_config(source, "vllm", method)
    problems = vllm_problems(cfg)
    if problems:
        raise ExportError(f"{source}: vLLM cannot load this adapter: {'; '.join(problems)}; export it merged "
                          f"(--format hf) and serve that folder with vLLM")
    weights = source / "adapter_model.safetensors"
    if not weights.exists():
        raise ExportError(f"{source}: adapter_model.safetensors is missing")
    base = model or base_model_of(source)
    served = serve_name or resolve_model_path(base)
    clean = {k: v for k, v in cfg.items() if v is not None}
    clean.update(base_model_name_or_path=served, bias="none", modules_to_save=None, inference_mode=True)
    (tmp / "adapter_config.json").write_text(json.dumps(clean, indent=2) + "\n")
    shutil.copy2(weights, tmp / "adapter_model.safetensors")
    rank = max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    name = source.resolve().name
    command = f"vllm serve {served} --enable-lora --max-lora-rank {max_rank} --lora-modules {name}=<out>"
    (tmp / "README.md").write_text(
        f"# {name}: a LoRA adapter for vLLM\n\nBase model: `{served}` (rank {rank}, alpha {cfg.get('lora_alpha')}"
        f"{', rsLoRA' if cfg.get('use_rslora') else ''}).\n\n```\n{command}\n```\n\nThen request "
        f"`\"model\": \"{name}\"`. `--max-lora-rank {max_rank}` is the smallest value vLLM allows that holds rank "
        f"{rank} (allowed: {', '.join(map(str, VLLM_MAX_LORA_RANKS))}).\n")
    card = _base_card(source, "vllm", method, base, f"PEFT LoRA folder for vLLM (rank {rank}, --max-lora-rank "
                      f"{max_rank}), base_model_name_or_path = {served}")
    card.update(max_lora_rank=max_rank, serve_command=command)
    card["use"] = [command]
    if verify:
        card["verification"]["vLLM PEFTHelper"] = vllm_validate(tmp, max_rank)
    return card


def vllm_python() -> str | None:
    """A Python with vLLM installed: $TUNEKIT_VLLM_PYTHON, else .vllm-venv (benchmarks/serve/install_vllm.sh)."""
    import os

    for candidate in (os.environ.get("TUNEKIT_VLLM_PYTHON"), ".vllm-venv/bin/python"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


VLLM_CHECK = """
import json, sys
from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
helper = PEFTHelper.from_local_dir(sys.argv[1], max_position_embeddings=None)
helper.validate_legal(LoRAConfig(max_lora_rank=int(sys.argv[2])))
import vllm
print(json.dumps({"vllm": vllm.__version__, "r": helper.r, "scaling": helper.vllm_lora_scaling_factor}))
"""


def vllm_validate(folder: Path, max_rank: int) -> dict:
    """Run vLLM's own adapter validation (PEFTHelper.validate_legal) on folder, in vLLM's Python."""
    import subprocess

    python = vllm_python()
    if python is None:
        return {"skipped": "no vLLM Python found (set TUNEKIT_VLLM_PYTHON or run benchmarks/serve/install_vllm.sh)"}
    proc = subprocess.run([python, "-c", VLLM_CHECK, str(folder), str(max_rank)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        raise ExportError(f"verification failed: vLLM's PEFTHelper refused the folder: "
                          f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return {"passed": True, **json.loads(proc.stdout.strip().splitlines()[-1])}
