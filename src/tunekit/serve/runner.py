"""The model runner: one forward over a step's tokens from many sequences, each with its own KV-cache slot.

A step is a list of `Work` items (a sequence and the tokens of it to compute now: a prefill chunk or one decode
token). Their tokens are flattened into one (N, hidden) activation, ordered by adapter so that batched LoRA sees
one contiguous row range per adapter (lora_batch.py). The projections and MLP run once over all N rows; attention
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
from .lora_batch import LoraWeights, apply_segments_

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Linear:
    """y = x W^T (+ b): W in the serving dtype, or int8 per output row with a scale (weight-only quantization)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, quantize: str | None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias.detach().to(dtype) if bias is not None else None
        if quantize == "int8":
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,) symmetric per output channel
            self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(dtype)
        else:
            self.weight, self.scale = weight.detach().to(dtype).contiguous(), None

    @property
    def nbytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.weight.numel() * self.weight.element_size() + extra

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
            self.layers.append({"in_norm": layer.input_layernorm.to(dtype),
                                "post_norm": layer.post_attention_layernorm.to(dtype),
                                **{n: Linear(m.weight, m.bias, dtype, quantize) for n, m in mods.items()}})
        # The head stays unquantized: its rows are the output distribution (and it is tied to the embedding here).
        self.lm_head = Linear(hf_model.lm_head.weight, None, dtype, None)
        self.act = F.silu
        self.cache = SlotCache(len(self.layers), max_slots, self.n_kv, self.head_dim, dtype, self.max_len)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module name: (in_features, out_features)} of the decoder's linear layers (same in every layer)."""
        return {n: (self.layers[0][n].in_features, self.layers[0][n].out_features) for n in LINEARS}

    @property
    def linear_bytes(self) -> int:
        """Bytes of the decoder's linear weights: what one decode step reads (and what int8 shrinks)."""
        return sum(layer[n].nbytes for layer in self.layers for n in LINEARS)

    @property
    def weight_bytes(self) -> int:
        total = self.embed.numel() * self.embed.element_size() + self.linear_bytes
        if self.lm_head.weight.data_ptr() != self.embed.data_ptr():
            total += self.lm_head.nbytes
        return total

    def _attention(self, q: torch.Tensor, layer: int, work: list[Work], offsets: list[int]) -> torch.Tensor:
        """q (N, H, D) -> (N, H*D): prefill chunks one by one, decode tokens in one masked call over the slots."""
        out = torch.empty_like(q)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        decode = [(i, w) for i, w in enumerate(work) if len(w.tokens) == 1 and w.start > 0]
        for i, w in enumerate(work):
            if len(w.tokens) == 1 and w.start > 0:
                continue
            t, end = len(w.tokens), w.start + len(w.tokens)
            qi = q[offsets[i]: offsets[i] + t].transpose(0, 1).unsqueeze(0)  # (1, H, t, D)
            k = k_cache[w.slot, :, :end].unsqueeze(0)  # (1, kv, end, D): a view of the slot
            v = v_cache[w.slot, :, :end].unsqueeze(0)
            if w.start == 0:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            else:  # query i of the chunk sees keys 0 .. start+i
                mask = torch.arange(end)[None, :] <= (w.start + torch.arange(t))[:, None]
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[offsets[i]: offsets[i] + t] = o[0].transpose(0, 1)
        if decode:
            slots = torch.tensor([w.slot for _, w in decode])
            lengths = torch.tensor([w.start + 1 for _, w in decode])
            used = int(slots.max()) + 1
            width = int(lengths.max())
            # every slot in [0, used) takes part; free ones get a dummy query that sees key 0 only
            qs = q.new_zeros(used, self.n_heads, 1, self.head_dim)
            rows = torch.tensor([offsets[i] for i, _ in decode])
            qs[slots, :, 0] = q[rows]
            slot_len = torch.ones(used, dtype=torch.long)
            slot_len[slots] = lengths
            mask = (torch.arange(width)[None, :] < slot_len[:, None])[:, None, None, :]  # (used, 1, 1, width)
            o = F.scaled_dot_product_attention(qs, k_cache[:used, :, :width], v_cache[:used, :, :width],
                                               attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[rows] = o[slots, :, 0]
        return out.reshape(q.shape[0], -1)

    @torch.inference_mode()
    def forward(self, work: list[Work], all_positions: bool = False) -> torch.Tensor:
        """fp32 logits (M, V) for the items with wants_logits, in their order in `work` (sorted by adapter);
        with all_positions, (N, V) for every token of the step (teacher-forced scoring)."""
        ids = torch.tensor([t for w in work for t in w.tokens])
        positions = torch.tensor([w.start + j for w in work for j in range(len(w.tokens))])
        slots = torch.tensor([w.slot for w in work for _ in w.tokens])
        offsets, segments, n = [], [], 0
        for w in work:
            offsets.append(n)
            if w.lora is not None:
                if segments and segments[-1][0] is w.lora and segments[-1][2] == n:
                    segments[-1] = (w.lora, segments[-1][1], n + len(w.tokens))
                else:
                    segments.append((w.lora, n, n + len(w.tokens)))
            n += len(w.tokens)
        self.cache.ensure(int(positions.max()) + 1)
        x = self.embed[ids]  # (N, hidden)
        cos, sin = self.rotary(x, positions[None])  # (1, N, D) each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (N, 1, D): broadcast over heads

        def lin(layer: dict, i: int, name: str, h: torch.Tensor) -> torch.Tensor:
            y = layer[name](h)
            return apply_segments_(y, h, (i, name), segments) if segments else y

        for i, layer in enumerate(self.layers):
            h = layer["in_norm"](x)
            q = lin(layer, i, "q_proj", h).view(n, self.n_heads, self.head_dim)
            k = lin(layer, i, "k_proj", h).view(n, self.n_kv, self.head_dim)
            v = lin(layer, i, "v_proj", h).view(n, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.cache.write(i, slots, positions, k, v)
            x = x + lin(layer, i, "o_proj", self._attention(q, i, work, offsets))
            h = layer["post_norm"](x)
            x = x + lin(layer, i, "down_proj", self.act(lin(layer, i, "gate_proj", h)) * lin(layer, i, "up_proj", h))
        if all_positions:
            return self.lm_head(self.norm(x)).float()
        last = torch.tensor([offsets[j] + len(w.tokens) - 1 for j, w in enumerate(work) if w.wants_logits])
        if last.numel() == 0:
            return torch.empty(0, self.vocab_size)
        return self.lm_head(self.norm(x[last])).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
