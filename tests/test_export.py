"""`tunekit export`: every format checked against the source by an independent reader.

References: the fp32 merge in PyTorch (tunekit merge, itself tested against base + adapter in test_merge.py);
transformers' own GGUF reader (gguf_file=, which undoes llama.cpp's q/k row order with its own code); llama.cpp
itself (the xllamacpp wheel); gguf-py's dequantizers for llama.cpp's k-quant encoder; Go's text/template for
the Ollama TEMPLATE; vLLM's own PEFTHelper where a vLLM Python is installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from method_checks import perturb_trainable_
from test_merge import fake_run
from tunekit.export import ExportError, export
from tunekit.export.llamacpp import available as llamacpp_available
from tunekit.export.quants import QUANTS, encode, more_bits, tensor_type

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="xllamacpp (llama.cpp) not installed")
needs_go = pytest.mark.skipif(shutil.which("go") is None and not Path("/usr/lib/go/bin/go").exists(),
                              reason="Go not installed (apt-get install golang-go; make setup does it as root)")

LORA = {"name": "lora", "r": 4, "alpha": 8.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def lora_run_dir(tmp_path_factory, tiny_model_dir, make_config) -> Path:
    return fake_run(make_config, tiny_model_dir, tmp_path_factory.mktemp("export") / "invoices", LORA)


def reference(run: Path):
    from tunekit.merging import load_merged
    from tunekit.models import load_tokenizer

    merged, _, _, tok = load_merged(str(run))
    return merged.eval(), load_tokenizer(tok)


# ----------------------------------------------------------------------------------------------- quant policy
def test_k_quant_mix_follows_the_rows_and_layers():
    n = 30
    assert [i for i in range(n) if more_bits(i, n)][:6] == [0, 1, 2, 5, 8, 11]
    # 576-wide rows are not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0; ffn_down (1536-wide rows) keeps k-quants
    assert tensor_type("blk.3.attn_q.weight", (576, 576), "q4_k_m", n, True).name == "Q5_0"
    assert tensor_type("blk.0.attn_v.weight", (192, 576), "q4_k_m", n, True).name == "Q8_0"
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "q4_k_m", n, True).name == "Q6_K"
    assert tensor_type("blk.3.ffn_down.weight", (576, 1536), "q4_k_m", n, True).name == "Q4_K"
    assert tensor_type("token_embd.weight", (49152, 576), "q4_k_m", n, True).name == "Q8_0"
    assert tensor_type("token_embd.weight", (49152, 512), "q4_k_m", n, True).name == "Q6_K"
    assert tensor_type("token_embd.weight", (49152, 512), "q4_k_m", n, False).name == "Q4_K"
    assert tensor_type("blk.0.attn_norm.weight", (576,), "q4_k_m", n, True).name == "F32"
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0", n, True).name == "F16"  # rows shorter than a block


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_1"])
def test_encoders_round_trip_through_gguf_py_dequantizers(qtype):
    """llama.cpp's k-quant encoder (ctypes) and gguf-py's numpy ones, read back by gguf-py's own dequantizer."""
    import gguf

    if qtype.endswith("_K") and not llamacpp_available():
        pytest.skip("k-quants use llama.cpp's encoder from xllamacpp")
    t = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    back = gguf.quants.dequantize(encode(x, t), t)
    rel = np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())
    bits = {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.56, "Q8_0": 8.5, "Q4_0": 4.5, "Q5_1": 6}[qtype]
    assert rel < 2.0 ** (2 - bits), (qtype, rel)  # about one quantization step of a b-bit code, not garbage
    assert rel > 0 or qtype == "F32"


def test_unknown_quant_and_format_are_refused_before_writing(lora_run_dir, tmp_path):
    with pytest.raises(ExportError, match=r"--quant 'q3_xx' is not supported; choose one of: f32, f16"):
        export(str(lora_run_dir), "gguf", str(tmp_path / "out"), quant="q3_xx", verify=False)
    with pytest.raises(ExportError, match=r"--format 'onnx' is not one of: hf, gguf, ollama, lora-gguf, vllm"):
        export(str(lora_run_dir), "onnx", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# ------------------------------------------------------------------------------------------------------- hf
def test_hf_export_reloads_in_plain_transformers_with_equal_logits(lora_run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    card = export(str(lora_run_dir), "hf", str(tmp_path / "hf"))
    check = card["verification"]["transformers reload"]
    assert check["max_abs_diff"] == 0.0 and check["top1_agreement"] == 1.0
    merged, tok = reference(lora_run_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 15, 27, 300, 4000, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-6)
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    assert (tmp_path / "hf" / "chat_template.jinja").exists()
    written = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert {f["path"] for f in written["files"]} >= {"model.safetensors", "tokenizer.json", "generation_config.json"}
    assert "## Verification" in (tmp_path / "hf" / "EXPORT.md").read_text()


# ----------------------------------------------------------------------------------------------------- gguf
@needs_llamacpp
def test_gguf_f32_is_read_back_exactly_by_transformers_and_llama_cpp(lora_run_dir, tmp_path):
    import gguf

    card = export(str(lora_run_dir), "gguf", str(tmp_path / "g"), quant="f32", threads=1)
    tf = card["verification"]["transformers gguf_file"]
    assert tf["max_abs_diff"] < 1e-4 and tf["top1_agreement"] == 1.0  # transformers undoes our q/k row order
    lc = card["verification"]["llama.cpp"]
    assert lc["top1_agreement"] >= 0.99 and lc["chat_template_identical"] == lc["prompts"]
    assert lc["max_logprob_gap"] < 1e-2
    fields = gguf.GGUFReader(tmp_path / "g" / card["gguf"]).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "im_start" in fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with q/k scaled up: attention far from uniform, so RoPE's pairing shows in the logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@needs_llamacpp
@pytest.mark.parametrize("reorder", [True, False], ids=["llama.cpp-row-order", "negative-control"])
def test_llama_cpp_needs_the_qk_row_order(reorder, sharp_model_dir, tmp_path, monkeypatch):
    """A full model folder with sharp attention: with the q/k reorder llama.cpp matches PyTorch; without, the
    same file (transformers' row order) does not: the check would catch a writer that forgot it."""
    from tunekit.export import gguf_file

    if not reorder:
        monkeypatch.setattr(gguf_file, "REORDER_QK", set())
        monkeypatch.setattr("tunekit.export.formats.LLAMACPP_FLOOR", {"f32": 0.0})  # measure instead of refusing
    card = export(str(sharp_model_dir), "gguf", str(tmp_path / "g"), model=str(sharp_model_dir), quant="f32",
                  threads=1)
    gap = card["verification"]["llama.cpp"]["max_logprob_gap"]
    assert gap < 1e-2 if reorder else gap > 0.5, gap


@needs_llamacpp
def test_k_quant_gguf_loads_in_llama_cpp_and_transformers(lora_run_dir, tmp_path):
    card = export(str(lora_run_dir), "gguf", str(tmp_path / "q"), quant="q4_k_m", threads=1)
    assert card["tensor_types"].get("F32") and set(card["tensor_types"]) <= {"F32", "F16", "Q4_K", "Q5_0", "Q6_K",
                                                                              "Q8_0"}
    assert card["verification"]["llama.cpp"]["chat_template_identical"] == 8


# --------------------------------------------------------------------------------------------------- ollama
@needs_llamacpp
@needs_go
def test_ollama_modelfile_template_renders_like_the_jinja_template_in_go(lora_run_dir, tmp_path):
    card = export(str(lora_run_dir), "ollama", str(tmp_path / "o"), quant="q8_0", threads=1)
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{card['gguf']}\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert card["verification"]["Go text/template vs Jinja"] == {"chats": 5, "identical": 5}


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                "<|end_header_id|>\n\n{% endif %}")
ZEPHYR_STYLE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TRIMS = LLAMA3_STYLE.replace("m['content'] }}", "m['content'] | trim }}")
MERGES_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


@needs_go
@pytest.mark.parametrize("name,template", [("llama3", LLAMA3_STYLE), ("zephyr", ZEPHYR_STYLE)])
def test_go_template_equals_other_chat_templates(name, template, tokenizer, tmp_path):
    from tunekit.export.ollama import check_template, go_binary, go_template, wrappers

    def render(messages, gen, **kw):
        kw.setdefault("bos_token", "<|begin_of_text|>")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template, **kw)

    w = wrappers(render, "<|begin_of_text|>")
    assert w.default_system is None and w.start == ("<|begin_of_text|>" if name == "llama3" else "")
    assert check_template(go_template(w), None, render, go_binary(tmp_path))["identical"] == 5


@needs_go
@pytest.mark.parametrize("template,message", [(TRIMS, r"differ on check chat 4"),
                                              (MERGES_SYSTEM, r"dropped a message's content")])
def test_templates_go_cannot_express_are_refused_with_the_difference(template, message, tokenizer, tmp_path):
    from tunekit.export.ollama import TemplateError, check_template, go_binary, go_template, wrappers

    def render(messages, gen, **kw):
        kw.setdefault("bos_token", "<|begin_of_text|>")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template, **kw)

    with pytest.raises(TemplateError, match=message):
        check_template(go_template(wrappers(render, "<|begin_of_text|>")), None, render, go_binary(tmp_path))


# ------------------------------------------------------------------------------------------------ lora-gguf
def peft_adapter(tiny_model_dir, out: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(target_modules="all-linear", init_lora_weights=False, **lora))
    perturb_trainable_(model, scale=0.05)  # deltas the size of the weights: larger ones blow the logits up
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@needs_llamacpp
@pytest.mark.parametrize("spec", [dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=16, use_rslora=True),
                                  dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                                       alpha_pattern={"v_proj": 3.0})],
                         ids=["lora", "rslora", "per-module-ranks"])
def test_lora_gguf_applied_by_llama_cpp_equals_the_pytorch_merge(spec, tiny_model_dir, tmp_path):
    adapter = peft_adapter(tiny_model_dir, tmp_path / "ad", **spec)
    card = export(str(adapter), "lora-gguf", str(tmp_path / "lg"), quant="f32", threads=1)
    with_lora = card["verification"]["llama.cpp base + adapter.gguf vs PyTorch merge"]
    without = card["verification"]["llama.cpp base alone vs PyTorch merge (control)"]
    assert with_lora["top1_agreement"] >= 0.99 and with_lora["max_logprob_gap"] < 1e-2
    assert without["max_logprob_gap"] > 10 * max(with_lora["max_logprob_gap"], 1e-3)  # the adapter matters
    import gguf

    fields = gguf.GGUFReader(tmp_path / "lg" / "adapter.gguf").fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == spec["lora_alpha"]


def test_adapter_formats_refuse_what_they_cannot_carry(tiny_model_dir, make_config, tmp_path):
    dora = fake_run(make_config, tiny_model_dir, tmp_path / "dora", {**LORA, "dora": True})
    for fmt in ("lora-gguf", "vllm"):
        with pytest.raises(ExportError, match=r"DoRA.*export it merged with --format hf, gguf or ollama"):
            export(str(dora), fmt, str(tmp_path / fmt), verify=False)
    full = fake_run(make_config, tiny_model_dir, tmp_path / "full", {"name": "full"})
    with pytest.raises(ExportError, match=r"a full run has no LoRA adapter to export as vllm; export the model"):
        export(str(full), "vllm", str(tmp_path / "v"), verify=False)
    ia3 = fake_run(make_config, tiny_model_dir, tmp_path / "ia3", {"name": "ia3"})
    with pytest.raises(ExportError, match=r"IA3 adapters cannot be exported as lora-gguf"):
        export(str(ia3), "lora-gguf", str(tmp_path / "l"), verify=False)
    prefix = fake_run(make_config, tiny_model_dir, tmp_path / "prefix", {"name": "prefix", "num_virtual_tokens": 3})
    with pytest.raises(ExportError, match=r"cannot be merged.*serve it with `tunekit serve`"):
        export(str(prefix), "gguf", str(tmp_path / "p"), verify=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left


# ----------------------------------------------------------------------------------------------------- vllm
def test_vllm_folder_names_the_smallest_allowed_max_lora_rank(tiny_model_dir, tmp_path):
    from tunekit.export.formats import vllm_problems, vllm_python

    adapter = peft_adapter(tiny_model_dir, tmp_path / "ad", r=4, lora_alpha=8, rank_pattern={"down_proj": 12})
    card = export(str(adapter), "vllm", str(tmp_path / "v"), serve_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                  verify=vllm_python() is not None)
    assert card["max_lora_rank"] == 16  # rank 12 -> 16 (vLLM allows 1, 8, 16, 32, ...)
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["bias"] == "none"
    readme = (tmp_path / "v" / "README.md").read_text()
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 16 --lora-modules ad=" in readme
    if vllm_python() is not None:
        assert card["verification"]["vLLM PEFTHelper"]["passed"]
    assert vllm_problems({"r": 8, "use_dora": True, "bias": "all", "init_lora_weights": "pissa"}) == [
        "DoRA (use_dora)", "bias='all' (vLLM takes bias='none')", "init_lora_weights='pissa' (changes the base weights)"]


# ---------------------------------------------------------------------------------------------- bad input, CLI
def test_bad_input_is_refused_and_leaves_nothing(lora_run_dir, tmp_path, monkeypatch, capsys):
    from tunekit.cli import main

    assert main(["export", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"exists and is not empty; choose a new folder or pass --overwrite"):
        export(str(lora_run_dir), "hf", str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match=r"inside the run folder"):
        export(str(lora_run_dir), "hf", str(lora_run_dir / "export"))

    def broken(*args, **kwargs):  # a writer that dies half-way
        (args[1] / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr("tunekit.export.formats.export_hf", broken)
    with pytest.raises(KeyboardInterrupt):
        export(str(lora_run_dir), "hf", str(tmp_path / "half"))
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half.partial-*"))


def test_cli_prints_the_verification_and_how_to_use(lora_run_dir, tmp_path, capsys):
    from tunekit.cli import main

    assert main(["export", str(lora_run_dir), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype",
                 "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "exported hf:" in out and "verified, transformers reload:" in out and "use: tunekit serve --model" in out


# ------------------------------------------------------------------------------------------ the real model
@pytest.mark.slow
@needs_llamacpp
def test_real_model_gguf_f16_agrees_with_pytorch_in_llama_cpp(tmp_path):
    """SmolLM2-135M + a LoRA: f16 GGUF in llama.cpp gives PyTorch's greedy tokens at >= 99% of positions."""
    from peft import LoraConfig, get_peft_model

    from tunekit.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model("smollm2-135m", dtype="float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    model.save_pretrained(tmp_path / "real")
    load_tokenizer("smollm2-135m").save_pretrained(tmp_path / "real")
    card = export(str(tmp_path / "real"), "gguf", str(tmp_path / "g"), model="smollm2-135m", quant="f16")
    lc = card["verification"]["llama.cpp"]
    assert lc["top1_agreement"] >= 0.99 and lc["chat_template_identical"] == lc["prompts"]
    assert card["tensor_types"] == {"F16": 211, "F32": 61}
