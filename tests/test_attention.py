"""Packed-row attention: the varlen flash path (CUDA) against SDPA per sequence.

The CPU tests check our glue around torch's varlen kernel (layouts, grouped KV heads, causal flag, scale,
fallback) by standing in a reference for the kernel; the CUDA test checks the real kernel where there is one.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from tunekit import attention


def per_sequence_reference(q, k, v, cu, scale):
    """(1, H, T, D) q and (1, Hkv, T, D) k/v -> (1, H, T, D): fp32 causal softmax attention of each sequence."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(),
                                                   is_causal=True, scale=scale))
    return torch.cat(outs, 2)


def fake_varlen(signature: str):
    """A stand-in for torch's varlen_attn with the keyword spelling of one torch version, computing in fp32."""

    def modern(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               enable_gqa=False):
        assert window_size == (-1, 0) and cu_seq_q.dtype == torch.int32 and query.is_contiguous()
        assert enable_gqa == (query.shape[1] != key.shape[1])
        assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
        return _run(query, key, value, cu_seq_q, scale)

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and query.shape[1] == key.shape[1]  # no GQA in this version: heads repeated by us
        return _run(query, key, value, cu_seq_q, None)

    def _run(query, key, value, cu, scale):  # (T, H, D) -> (T, H, D)
        out = per_sequence_reference(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                     value.transpose(0, 1)[None], cu, scale)
        return out[0].transpose(0, 1).to(query.dtype).contiguous()  # the kernel returns (T, H, D) contiguous

    return {"modern": modern, "old": old}[signature]


@pytest.mark.parametrize("signature", ["modern", "old"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_glue_matches_per_sequence_attention(monkeypatch, signature, kv_heads):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen(signature))
    monkeypatch.setattr(attention, "_varlen_broken", None)
    torch.manual_seed(0)
    T, H, D = 23, 4, 8
    # The projections' layout: (1, T, H, D) viewed as (1, H, T, D), as transformers hands it to attention.
    q = torch.randn(1, T, H, D).transpose(1, 2)
    k, v = (torch.randn(1, T, kv_heads, D).transpose(1, 2) for _ in range(2))
    cu = torch.tensor([0, 5, 6, 17, 23])
    scale = D**-0.5  # the old signature has no scale keyword: only the default is exact there
    out = attention.varlen_causal_attention(q, k, v, cu, 11, scale)
    assert out.shape == (1, H, T, D)
    torch.testing.assert_close(out, per_sequence_reference(q, k, v, cu, scale), rtol=1e-5, atol=1e-6)
    # The caller turns it back into (1, T, H, D) without a copy.
    assert out.transpose(1, 2).is_contiguous()


def test_varlen_failure_falls_back_once_with_a_warning(monkeypatch):
    import torch.nn.attention.varlen as varlen

    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    broken.__signature__ = inspect.signature(fake_varlen("modern"))
    monkeypatch.setattr(varlen, "varlen_attn", broken)
    monkeypatch.setattr(attention, "_varlen_broken", None)
    q = k = v = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 2, 6])
    with pytest.warns(UserWarning, match="varlen flash attention failed.*Ampere"):
        assert attention.varlen_causal_attention(q, k, v, cu, 4, None) is None
    assert attention.varlen_causal_attention(q, k, v, cu, 4, None) is None  # not tried again
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_kernel_on_cuda_matches_sdpa_per_sequence(monkeypatch, kv_heads):
    monkeypatch.setattr(attention, "_varlen_broken", None)
    torch.manual_seed(0)
    T, H, D = 700, 8, 64
    cu = torch.tensor([0, 150, 151, 420, 700], device="cuda", dtype=torch.int32)

    def inputs():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, T, kv_heads, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, T, kv_heads, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
        return [t.detach().requires_grad_() for t in (q, k, v)]

    grad = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
    results = []
    for use_varlen in (True, False):
        monkeypatch.setattr(attention, "_varlen_broken", None if use_varlen else "off for the reference")
        q, k, v = inputs()
        out = attention._per_sequence(q, k, v, cu, D**-0.5, 0.0)
        out.backward(grad)
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    assert attention._varlen_broken is None or attention._varlen_broken == "off for the reference"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
