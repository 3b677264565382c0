"""Write a merged transformers model as a GGUF file llama.cpp loads: tensors, architecture and tokenizer metadata.

    merged model (fp32 state dict) -> gguf names (gguf-py's TensorNameMap) -> q/k row order -> quant -> file

Two facts about llama.cpp's Llama layout shape this file. Its RoPE rotates adjacent pairs (x0, x1), (x2, x3)...
while transformers' `rotate_half` pairs x_i with x_{i+d/2}; so the rows of q_proj and k_proj (and of a LoRA B
that writes into them) are reordered per head: (n_head, 2, d/2, in) -> swap axes 1, 2 -> (n_head*d, in).
Qwen2 uses NeoX-style RoPE in llama.cpp too and needs no reorder. And llama.cpp reads the vocabulary, merges,
special ids and chat template from the file itself, so the tokenizer travels inside the GGUF.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf

from .quants import QUANTS, encode, tensor_type

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
REORDER_QK = {"llama", "mistral"}
# tokenizer.ggml.pre names llama.cpp knows, by the sha256 of the tokenizer.json "pre_tokenizer" section
# (computed by tunekit from the tokenizers these names belong to; extend with --gguf-pre for others).
KNOWN_PRE = {"baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "smollm"}


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF: an architecture, tokenizer or rope type tunekit does not map."""


def reorder_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head * d, ...) rows in transformers' rotate-half order -> llama.cpp's adjacent-pair order, per head."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def arch_of(config) -> str:
    model_type = config.model_type
    if model_type not in ARCHS:
        raise GGUFExportError(f"model_type {model_type!r} has no GGUF mapping in tunekit (supported: "
                              f"{', '.join(sorted(ARCHS))}); export --format hf and convert with llama.cpp's own "
                              f"convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise GGUFExportError(f"rope_type {rope.get('rope_type')!r} is not mapped to GGUF by tunekit yet "
                              f"(only the default RoPE)")
    return model_type


def gguf_name(hf_name: str, config) -> str:
    names = gguf.get_tensor_name_map(ARCHS[config.model_type], config.num_hidden_layers)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name for {config.model_type}")
    return name


def gguf_tensors(state: dict, config) -> dict[str, np.ndarray]:
    """{gguf name: float32 array} from a transformers state dict, q/k reordered where llama.cpp wants it."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        array = tensor.detach().to("cpu").float().numpy()
        if config.model_type in REORDER_QK and ".self_attn.q_proj." in hf_name:
            array = reorder_qk(array, heads)
        elif config.model_type in REORDER_QK and ".self_attn.k_proj." in hf_name:
            array = reorder_qk(array, kv)
        out[gguf_name(hf_name, config)] = array
    return out


@dataclass
class TokenizerInfo:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    eot: list[int]
    add_bos: bool
    chat_template: str | None


def pre_tokenizer_hash(tokenizer_json: dict) -> str:
    return hashlib.sha256(json.dumps(tokenizer_json.get("pre_tokenizer"), sort_keys=True).encode()).hexdigest()


def tokenizer_info(tokenizer, n_vocab: int, pre: str | None = None, source_gguf: Path | None = None) -> TokenizerInfo:
    """The GGUF tokenizer fields of a transformers fast tokenizer with a byte-level BPE model (GPT-2 style)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or not _byte_level(spec):
        raise GGUFExportError(f"tokenizer model {model['type']!r} (byte-level: {_byte_level(spec)}) is not mapped to "
                              f"GGUF by tunekit; only byte-level BPE tokenizers (GPT-2 style) are")
    if pre is None and source_gguf is not None:
        field = gguf.GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        pre = field.contents() if field is not None else None
    pre = pre or KNOWN_PRE.get(pre_tokenizer_hash(spec))
    if pre is None:
        raise GGUFExportError("cannot tell llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for this tokenizer; "
                              "pass --gguf-pre NAME (the name llama.cpp's convert_hf_to_gguf.py gives this model)")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    eot = sorted({tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()} - {eos})
    return TokenizerInfo(tokens, [int(t) for t in types], merges, pre, bos, eos, tokenizer.unk_token_id,
                         tokenizer.pad_token_id, eot, bool(probe and bos is not None and probe[0] == bos),
                         tokenizer.chat_template)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _byte_level(spec: dict) -> bool:
    pre = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "ByteLevel" in pre


def add_tokenizer(writer: gguf.GGUFWriter, tok: TokenizerInfo) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    writer.add_token_merges(tok.merges)
    for setter, value in ((writer.add_bos_token_id, tok.bos), (writer.add_eos_token_id, tok.eos),
                          (writer.add_unk_token_id, tok.unk), (writer.add_pad_token_id, tok.pad)):
        if value is not None:
            setter(value)
    if tok.eot:
        writer.add_eot_token_id(tok.eot[0])
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def add_architecture(writer: gguf.GGUFWriter, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_model_gguf(path: Path, state: dict, config, tok: TokenizerInfo, quant: str, name: str) -> dict[str, str]:
    """Write the GGUF; returns {tensor name: GGML type name} (what the card lists)."""
    arch = arch_of(config)
    tensors = gguf_tensors(state, config)
    tied = "output.weight" not in tensors
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_architecture(writer, config)
    writer.add_file_type(QUANTS[quant][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tok)
    types = {}
    for gname, array in tensors.items():
        qtype = tensor_type(gname, array.shape, quant, config.num_hidden_layers, tied)
        data = encode(array, qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                        gguf.GGMLQuantizationType.F16) else None)
        types[gname] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types
