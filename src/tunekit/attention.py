"""Attention for packed rows without a (T, T) mask.

transformers builds a block-diagonal (1, 1, T, T) mask for packed rows under sdpa, so SDPA attends over
the whole row (cost ~T^2) and then masks most of it away, and CPUs fall back to the slow masked path. We
register an attention implementation, "tunekit_sdpa", that takes the sequence boundaries (`cu_seq_lens_q`,
the same keyword flash-attention's varlen path uses) and runs causal SDPA per sequence: cost sum(L_i^2),
no mask tensor. On CUDA (fp16/bf16, no dropout) the whole row goes through one call of torch's variable-length
flash attention (`torch.nn.attention.varlen.varlen_attn`) instead of one SDPA call per sequence. Without
boundaries (padded batches, generation) it is exactly transformers' sdpa.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

NAME = "tunekit_sdpa"
_registered = False
_varlen_broken: str | None = None  # why the varlen kernel is not used in this process (after a failure)


def packed_causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), like transformers' attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    p_drop = dropout if module.training else 0.0
    out = _per_sequence(query, key, value, cu, scaling, p_drop)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


# Eager under torch.compile: traced, the loop would specialise on each row's sequence lengths and recompile for
# every new set of lengths (measured: ~160 s per step, dynamo's cache limit hit); compiled decoder layers break
# their graph here and resume after it.
@torch.compiler.disable
def _per_sequence(query, key, value, cu: torch.Tensor, scaling, p_drop: float) -> torch.Tensor:
    """Causal attention of each packed sequence to itself: (B, H, T, D) and starts [0, ..., T] -> (B, H, T, D)."""
    lengths = (cu[1:] - cu[:-1]).tolist()  # here, not in the caller: a Python list there would be guarded on
    if query.is_cuda and p_drop == 0.0 and query.shape[0] == 1 and query.dtype in (torch.float16, torch.bfloat16):
        out = varlen_causal_attention(query, key, value, cu, max(lengths), scaling)
        if out is not None:
            return out
    gqa = query.shape[1] != key.shape[1]
    outs = []
    # split (not slicing): its backward concatenates the gradients instead of zero-filling a full-size tensor
    # per sequence, which cost ~30% of the attention time on CPU.
    for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)):
        # One packed sequence: (B, H, L, D) attends causally to itself only.
        if p_drop == 0.0 and query.device.type == "cpu":
            outs.append(grouped_causal_attention(q, k, v, scaling))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, scale=scaling, is_causal=True,
                                                       enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def varlen_causal_attention(query, key, value, cu: torch.Tensor, max_len: int, scaling) -> torch.Tensor | None:
    """One packed row through torch's varlen flash attention: (1, H, T, D), (1, Hkv, T, D) -> (1, H, T, D).

    None when this torch has no varlen kernel or it failed once in this process (then the caller's per-sequence
    SDPA runs, with a warning the first time). torch 2.9-2.10 spell causal `is_causal=True`, later versions
    `window_size=(-1, 0)`; versions without `enable_gqa` get the KV heads repeated (as transformers' repeat_kv).
    """
    global _varlen_broken
    if _varlen_broken is not None:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        _varlen_broken = f"torch {torch.__version__} has no torch.nn.attention.varlen"
        return None
    params = _keywords(varlen_attn)
    q = query[0].transpose(0, 1)  # (T, H, D): the projection's own layout, usually no copy
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (T, Hkv, D)
    kwargs = {"scale": scaling} if "scale" in params else {}
    kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" not in params and scaling is not None and scaling != q.shape[-1] ** -0.5:
        q = q * (scaling * q.shape[-1] ** 0.5)  # old signature: only the default 1/sqrt(D) scale
    cu = cu.to(device=q.device, dtype=torch.int32)
    try:
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kwargs)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        _varlen_broken = f"{type(e).__name__}: {e}"
        warnings.warn(f"tunekit: varlen flash attention failed ({_varlen_broken}); using SDPA per sequence")
        return None
    return out.unsqueeze(0).transpose(1, 2)  # (1, H, T, D) view of the (1, T, H, D) result


@lru_cache(maxsize=4)
def _keywords(fn) -> frozenset[str]:
    """The parameter names of `fn`, read once per function (the varlen call runs per layer and step)."""
    return frozenset(inspect.signature(fn).parameters)


def grouped_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention with grouped KV heads as two batched matmuls.

    q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D). For the short sequences of fine-tuning data
    (a few hundred tokens) this runs forward+backward faster on CPU than SDPA's flash kernel (measured, 2 cores,
    bf16, 8 sequences of 250-320 tokens, 9 query / 3 KV heads of 64: 23 ms against 47 ms per layer), and the
    L x L scores of one sequence are small. Query head h uses KV head h // (H // Hkv), as in transformers'
    repeat_kv. The causal mask is an additive bias fused into the first matmul (baddbmm) and the scale is applied
    to q, the smaller tensor: both save a pass over the (G*L, L) scores (31 -> 23 ms in the measurement above).
    The softmax runs in the scores' dtype (torch's CPU kernel computes a bf16 row in fp32 and rounds the result
    once, as a cast of an fp32 softmax would): no fp32 copy of the probabilities is made or kept for backward
    (23 -> 21 ms; relative error of dq against an fp32 reference 5.5e-3 instead of 5.2e-3).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    groups = H // Hkv
    qg = (q * (scale if scale is not None else D**-0.5)).reshape(B * Hkv, groups * L, D)  # (B*Hkv, G*L, D)
    scores = torch.baddbmm(_causal_bias(L, groups, q.dtype, q.device), qg,
                           k.reshape(B * Hkv, L, D).transpose(1, 2))  # (B*Hkv, G*L, L)
    probs = scores.softmax(-1)  # in the input dtype: torch's CPU kernel accumulates bf16 rows in fp32
    return torch.bmm(probs, v.reshape(B * Hkv, L, D)).view(B, H, L, D)


_bias_cache: dict = {}


def _causal_bias(L: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(G*L, L): 0 on and below the diagonal, -inf above, repeated for the G query heads sharing a KV head."""
    key = (L, groups, dtype, device)
    bias = _bias_cache.get(key)
    if bias is None:
        if len(_bias_cache) > 64:  # sequence lengths vary: keep at most ~64 (G*L, L) tensors
            _bias_cache.clear()
        bias = torch.full((L, L), float("-inf"), dtype=dtype, device=device).triu(1).repeat(groups, 1)
        _bias_cache[key] = bias
    return bias


def _mask_unless_packed(*args, attention_mask=None, **kwargs):
    """Padded batches keep sdpa's mask; packed rows (no 2-D mask) get none: the boundaries do the work."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make "tunekit_sdpa" a valid attn_implementation (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, packed_causal_attention)
        AttentionMaskInterface.register(NAME, _mask_unless_packed)
        _registered = True
    return NAME


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts of a packed (1, T) row from its restarting positions: [0, L1, L1+L2, ..., T]."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, total]).to(torch.int32)
