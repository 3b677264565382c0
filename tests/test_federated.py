"""Aggregation of the data owners' LoRA adapters: the bias of FedAvg on A and B, and the schemes without it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tunekit.federated.aggregate import (ClientUpdate, FederatedError, aggregate, bytes_sent, lora_pairs,
                                         product_bias, refactor)

A, B = "model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.0.self_attn.q_proj.lora_B.default.weight"
NORM = "model.layers.0.input_layernorm.weight"  # a non-LoRA trainable tensor: plain average


def owners(seed: int = 0, r: int = 4, same_a: bool = False) -> tuple[dict, list[ClientUpdate]]:
    """A global adapter and 3 owners' updates of it, each trained (here: moved) its own way."""
    g = torch.Generator().manual_seed(seed)
    start = {A: torch.randn(r, 16, generator=g), B: torch.randn(12, r, generator=g) * 0.1, NORM: torch.ones(16)}
    ups = []
    for k, n in enumerate((10, 20, 30)):
        t = {name: v + 0.3 * torch.randn(v.shape, generator=g) for name, v in start.items()}
        if same_a:
            t[A] = start[A].clone()
        ups.append(ClientUpdate(f"owner{k}", t, n))
    return start, ups


def test_fedavg_of_a_and_b_is_biased_and_svd_is_not_worse():
    start, ups = owners()
    naive = aggregate(ups, "fedavg")
    svd = aggregate(ups, "svd")
    b_naive, b_svd = product_bias(ups, naive), product_bias(ups, svd)
    assert b_naive > 0.05  # mean(B) mean(A) != mean(B A)
    assert b_svd <= b_naive  # the closest rank-r matrix to the true average
    w = torch.tensor([10, 20, 30], dtype=torch.float64) / 60
    assert torch.allclose(naive[NORM].double(), sum(wk * u.tensors[NORM].double() for wk, u in zip(w, ups)))
    print(f"relative error of B A vs the owners' mean update: fedavg {b_naive:.3f}, svd {b_svd:.3f}")


def test_svd_is_exact_when_the_average_fits_the_rank():
    # Owners that share A: the mean update B_mean A has rank r, which the SVD recovers exactly.
    start, ups = owners(same_a=True)
    assert product_bias(ups, aggregate(ups, "svd")) < 1e-6
    delta = torch.randn(12, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    b, a = refactor(delta, 4)
    assert torch.allclose(b @ a, delta, atol=1e-10) and b.shape == (12, 4) and a.shape == (4, 16)


def test_ffa_lora_is_exact_and_sends_half():
    start, ups = owners(same_a=True)
    agg = aggregate(ups, "ffa", global_tensors=start)
    assert product_bias(ups, agg) < 1e-6
    assert torch.equal(agg[A], start[A])
    assert bytes_sent(start, "ffa") == (12 * 4 + 16) * 4 < bytes_sent(start, "fedavg")


def test_ffa_refuses_an_owner_that_trained_a():
    start, ups = owners()
    with pytest.raises(FederatedError, match="owner0.*FFA-LoRA keeps frozen"):
        aggregate(ups, "ffa", global_tensors=start)


def test_an_adapter_of_another_shape_names_the_owner_and_the_tensor():
    start, ups = owners()
    ups[1].tensors[A] = torch.zeros(8, 16)
    with pytest.raises(FederatedError, match=r"owner 'owner1': tensor .*lora_A.* shape \(8, 16\), the server's is \(4, 16\)"):
        aggregate(ups, "svd", expected={n: t.shape for n, t in start.items()})
    del ups[1].tensors[A]
    with pytest.raises(FederatedError, match="owner 'owner1' sent an adapter with other tensors"):
        aggregate(ups, "fedavg", expected={n: t.shape for n, t in start.items()})
    with pytest.raises(FederatedError, match="unknown aggregation 'mean'"):
        aggregate(ups, "mean")


def test_bias_on_adapters_trained_by_the_engine_on_three_owners_data(make_config, tmp_path, tokenizer):
    """Three owners fine-tune the same LoRA start (tiny model) on disjoint slices of the chat file; the naive
    FedAvg of their A and B misses their mean update, the SVD aggregation is closer."""
    import json

    from conftest import short_chat_records, write_jsonl
    from tunekit.engine import train

    records = short_chat_records(36)
    ups = []
    for k in range(3):
        data = write_jsonl(tmp_path / f"owner{k}.jsonl", records[k::3])
        out = tmp_path / f"owner{k}"
        train(make_config(out, {"method.name": "lora", "method.r": 4, "method.alpha": 8.0, "optim.lr": 2e-2,
                                "train.max_steps": 4, "data.val_fraction": 0.0}, train_file=data))
        tensors = load_file(str(out / "adapter_model.safetensors"))
        ups.append(ClientUpdate(f"owner{k}", tensors, n_examples=len(records[k::3])))
    assert lora_pairs(ups[0].tensors)
    b_naive = product_bias(ups, aggregate(ups, "fedavg"))
    b_svd = product_bias(ups, aggregate(ups, "svd"))
    assert b_svd < b_naive
    (tmp_path / "bias.json").write_text(json.dumps({"fedavg": b_naive, "svd": b_svd}))
    print(f"tiny model, 3 owners x 4 steps, r=4: relative error of the aggregated update: fedavg {b_naive:.4f}, "
          f"svd {b_svd:.4f}")
