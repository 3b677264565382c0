"""Attention for packed rows without a (T, T) mask.

transformers builds a block-diagonal (1, 1, T, T) mask for packed rows under sdpa, so SDPA attends over
the whole row (cost ~T^2) and then masks most of it away, and CPUs fall back to the slow masked path. We
register an attention implementation, "tunekit_sdpa", that takes the sequence boundaries (`cu_seq_lens_q`,
the same keyword flash-attention's varlen path uses) and runs causal SDPA per sequence: cost sum(L_i^2),
no mask tensor. Without boundaries (padded batches, generation) it is exactly transformers' sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunekit_sdpa"
_registered = False


def packed_causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), like transformers' attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # One packed sequence: (B, H, L, D) attends causally to itself only.
        outs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout if module.training else 0.0, scale=scaling, is_causal=True, enable_gqa=gqa))
    out = torch.cat(outs, dim=2)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


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
