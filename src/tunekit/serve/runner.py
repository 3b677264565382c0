"""The model runner: one forward over a step's tokens from many sequences, each with its own KV-cache slot.

A step is a list of `Work` items (a sequence and the tokens of it to compute now: a prefill chunk or one decode
token). Their tokens are flattened into one (N, hidden) activation; batched LoRA adds each token's adapter delta by a
per-token column mask (lora_batch.LoraBank). The projections and MLP run once over all N rows; attention
runs per prefill chunk (causal against the sequence's cached prefix) and once for all decode tokens (each query
against its own slot, masked to the slot's length, reading the cache in place).

Supported: decoder-only models with Llama's block (llama, mistral, qwen2: RMSNorm, RoPE, GQA, SwiGLU MLP, optional
q/k/v bias, tied or untied head). The weights are the HF model's own tensors cast to the serving dtype; RMSNorm and
the rotary embedding are HF's modules, so RoPE scaling variants follow transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import SlotCache
from .lora_batch import LoraBank, LoraWeights, packing_available

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv", "o_proj", "gate_up", "down_proj")


class Linear:
    """y = x W^T (+ b): W in the serving dtype (in oneDNN's blocked layout where the CPU computes bf16 natively),
    or int8 per output row with a scale (weight-only quantization).

    Measured on the Zen 4 machine (2 threads, SmolLM2's shapes, docs/serving.md): the blocked bf16 layout is
    1.3-2.4x faster than F.linear on the plain bf16 weight at 1-64 rows (oneDNN otherwise reorders per call);
    int8 (`_weight_int8pack_mm`, bf16 activations) beats it only at 1 row (41 vs 65 us on 576->1728) and loses
    from 4 rows on; with fp32 activations the int8 kernel is 4-40x slower than fp32 F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, quantize: str | None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias.detach().to(dtype) if bias is not None else None
        self.scale = self.packed = None
        if quantize == "int8":
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,) symmetric per output channel
            self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(dtype)
            self._bytes = self.weight.numel() + self.scale.numel() * self.scale.element_size()
            return
        self.weight = weight.detach().to(dtype).contiguous()
        self._bytes = self.weight.numel() * self.weight.element_size()
        if dtype == torch.bfloat16 and packing_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            self.weight = None  # the blocked copy is the only one kept

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.scale is not None:
            y = torch._weight_int8pack_mm(x, self.weight, self.scale)  # dequantizes inside the kernel
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


@dataclass
class Work:
    """Tokens of one sequence to run in this step: `tokens` at positions start .. start+len-1."""

    slot: int
    start: int
    tokens: list[int]
    lora: LoraWeights | None
    wants_logits: bool  # the chunk ends the prompt (or is a decode token): sample after it


class ModelRunner:
    def __init__(self, hf_model, dtype: torch.dtype, quantize: str | None = None, max_slots: int = 32,
                 max_len: int | None = None):
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"tunekit serve runs {', '.join(SUPPORTED_TYPES)} models; this one is "
                             f"{config.model_type!r}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize {quantize!r}: choose int8 or none")
        inner = hf_model.model
        self.config, self.dtype, self.quantize = config, dtype, quantize
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.vocab_size = config.vocab_size
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self.embed = inner.embed_tokens.weight.detach().to(dtype)
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.to(dtype)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            mods = {name: getattr(attn, name) for name in LINEARS[:4]} | {n: getattr(mlp, n) for n in LINEARS[4:]}
            # q, k, v as one matmul and gate, up as another: 4 weight reads per layer instead of 7 calls; per-row
            # int8 scales make the fused quantization identical to quantizing each part.
            self.layers.append({"in_norm": layer.input_layernorm.to(dtype),
                                "post_norm": layer.post_attention_layernorm.to(dtype),
                                "qkv": _fused([mods["q_proj"], mods["k_proj"], mods["v_proj"]], dtype, quantize),
                                "o_proj": Linear(mods["o_proj"].weight, mods["o_proj"].bias, dtype, quantize),
                                "gate_up": _fused([mods["gate_proj"], mods["up_proj"]], dtype, quantize),
                                "down_proj": Linear(mods["down_proj"].weight, mods["down_proj"].bias, dtype, quantize)})
        # {module name: (in, out)} of the HF model's linears (the same in every layer): what adapters are checked against
        self.shapes = {n: (m.in_features, m.out_features) for n, m in mods.items()}
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # where each HF module's output sits in the fused outputs: name -> (fused name, column start, end)
        inter = self.shapes["gate_proj"][1]
        self.columns = {"q_proj": ("qkv", 0, q_out), "k_proj": ("qkv", q_out, q_out + kv_out),
                        "v_proj": ("qkv", q_out + kv_out, q_out + 2 * kv_out), "o_proj": ("o_proj", None, None),
                        "gate_proj": ("gate_up", 0, inter), "up_proj": ("gate_up", inter, 2 * inter),
                        "down_proj": ("down_proj", None, None)}
        # The head stays unquantized: its rows are the output distribution (and it is tied to the embedding here).
        self.lm_head = Linear(hf_model.lm_head.weight, None, dtype, None)
        self.tied = hf_model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.act = F.silu
        self.bank: LoraBank | None = None  # the batched adapters' stacked factors (set_adapters)
        self.cache = SlotCache(len(self.layers), max_slots, self.n_kv, self.head_dim, dtype, self.max_len)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module name: (in_features, out_features)} of the decoder's linear layers (same in every layer)."""
        return dict(self.shapes)

    def set_adapters(self, adapters: list[LoraWeights]) -> None:
        """Restack the batched adapters (after a load or unload; between steps)."""
        out = {name: self.layers[0][name].out_features for name in FUSED}
        self.bank = LoraBank(adapters, len(self.layers), self.columns, out, self.dtype) if adapters else None

    @property
    def linear_bytes(self) -> int:
        """Bytes of the decoder's linear weights: what one decode step reads (and what int8 shrinks)."""
        return sum(layer[n].nbytes for layer in self.layers for n in FUSED)

    @property
    def weight_bytes(self) -> int:
        total = self.embed.numel() * self.embed.element_size() + self.linear_bytes
        if not self.tied:
            total += self.lm_head.nbytes
        return total

    def _attention_plan(self, work: list[Work], offsets: list[int]) -> tuple[list, dict | None]:
        """What attention needs, built once per step (the same for every layer): per prefill chunk its rows, slot,
        key length and mask; for the decode tokens their slots, rows and the (used slots, 1, 1, width) mask."""
        prefill, decode = [], []
        for i, w in enumerate(work):
            t, end = len(w.tokens), w.start + len(w.tokens)
            if t == 1 and w.start > 0:
                decode.append((offsets[i], w.slot, end))
            else:  # query j of the chunk sees keys 0 .. start+j (a plain causal mask when the chunk starts at 0)
                mask = None if w.start == 0 else torch.arange(end)[None, :] <= (w.start + torch.arange(t))[:, None]
                prefill.append((offsets[i], t, w.slot, end, mask))
        if not decode:
            return prefill, None
        rows = torch.tensor([r for r, _, _ in decode])
        slots = torch.tensor([s for _, s, _ in decode])
        used = int(slots.max()) + 1
        slot_len = torch.ones(used, dtype=torch.long)  # free slots in [0, used) see key 0 only (never NaN)
        slot_len[slots] = torch.tensor([n for _, _, n in decode])
        width = int(slot_len.max())
        mask = (torch.arange(width)[None, :] < slot_len[:, None])[:, None, None, :]  # (used, 1, 1, width)
        return prefill, {"rows": rows, "slots": slots, "used": used, "width": width, "mask": mask}

    def _attention(self, q: torch.Tensor, layer: int, plan: tuple[list, dict | None]) -> torch.Tensor:
        """q (N, H, D) -> (N, H*D): prefill chunks one by one, decode tokens in one masked call over the slots."""
        prefill, decode = plan
        out = torch.empty_like(q)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        for row, t, slot, end, mask in prefill:
            qi = q[row: row + t].transpose(0, 1).unsqueeze(0)  # (1, H, t, D)
            k = k_cache[slot, :, :end].unsqueeze(0)  # (1, kv, end, D): a view of the slot
            v = v_cache[slot, :, :end].unsqueeze(0)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=True)
            out[row: row + t] = o[0].transpose(0, 1)
        if decode is not None:
            used, width, slots, rows = decode["used"], decode["width"], decode["slots"], decode["rows"]
            # The query heads sharing a KV head become that head's "query positions": (used, kv, rep, D) against
            # (used, kv, width, D), no GQA expansion. bf16 on Zen 4 (16 sequences x 210 keys): 0.41 ms against
            # 2.1 ms for SDPA's enable_gqa path, identical results; fp32: 0.27 vs 0.23 ms.
            rep = self.n_heads // self.n_kv
            qs = q.new_zeros(used, self.n_kv, rep, self.head_dim)
            qs[slots] = q[rows].view(len(rows), self.n_kv, rep, self.head_dim)
            o = F.scaled_dot_product_attention(qs, k_cache[:used, :, :width], v_cache[:used, :, :width],
                                               attn_mask=decode["mask"], scale=self.scale)
            out[rows] = o[slots].reshape(len(rows), self.n_heads, self.head_dim)
        return out.reshape(q.shape[0], -1)

    @torch.inference_mode()
    def forward(self, work: list[Work], all_positions: bool = False) -> torch.Tensor:
        """fp32 logits (M, V) for the items with wants_logits, in their order in `work` (sorted by adapter);
        with all_positions, (N, V) for every token of the step (teacher-forced scoring)."""
        ids = torch.tensor([t for w in work for t in w.tokens])
        positions = torch.tensor([w.start + j for w in work for j in range(len(w.tokens))])
        slots = torch.tensor([w.slot for w in work for _ in w.tokens])
        offsets, n = [], 0
        for w in work:
            offsets.append(n)
            n += len(w.tokens)
        bank, masks = self.bank, None
        if bank is not None and any(w.lora is not None for w in work):
            missing = [w.lora.name for w in work if w.lora is not None and w.lora.name not in bank.index]
            if missing:
                raise ValueError(f"adapter(s) {', '.join(sorted(set(missing)))} are not in the runner's bank")
            owner = torch.tensor([bank.index[w.lora.name] if w.lora is not None else -1
                                  for w in work for _ in w.tokens])  # (N,) adapter of each token, -1 = base
            masks = bank.masks_for(owner, self.dtype)
        self.cache.ensure(int(positions.max()) + 1)
        x = self.embed[ids]  # (N, hidden)
        cos, sin = self.rotary(x, positions[None])  # (1, N, D) each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (N, 1, D): broadcast over heads

        plan = self._attention_plan(work, offsets)

        def lin(layer: dict, i: int, fused: str, h: torch.Tensor) -> torch.Tensor:
            y = layer[fused](h)
            return bank.apply_(y, h, i, fused, masks) if masks is not None else y

        q_end, k_end = self.columns["k_proj"][1], self.columns["v_proj"][1]
        inter = self.columns["up_proj"][1]
        for i, layer in enumerate(self.layers):
            h = layer["in_norm"](x)
            qkv = lin(layer, i, "qkv", h)
            q = qkv[:, :q_end].reshape(n, self.n_heads, self.head_dim)
            k = qkv[:, q_end:k_end].reshape(n, self.n_kv, self.head_dim)
            v = qkv[:, k_end:].reshape(n, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.cache.write(i, slots, positions, k, v)
            x = x + lin(layer, i, "o_proj", self._attention(q, i, plan))
            h = layer["post_norm"](x)
            gate_up = lin(layer, i, "gate_up", h)
            x = x + lin(layer, i, "down_proj", self.act(gate_up[:, :inter]) * gate_up[:, inter:])
        if all_positions:
            return self.lm_head(self.norm(x)).float()
        last = torch.tensor([offsets[j] + len(w.tokens) - 1 for j, w in enumerate(work) if w.wants_logits])
        if last.numel() == 0:
            return torch.empty(0, self.vocab_size)
        return self.lm_head(self.norm(x[last])).float()


def _fused(modules, dtype: torch.dtype, quantize: str | None) -> Linear:
    """One Linear whose output is the modules' outputs side by side."""
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    return Linear(torch.cat([m.weight for m in modules]), bias, dtype, quantize)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
