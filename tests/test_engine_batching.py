"""Packing, padding and the resumable batch stream.

The reference for packing is each sequence run on its own: a packed row must give every sequence exactly
the loss it has alone (no attention across sequences, positions restarting, targets shifted per example).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import get_args

import pytest
import torch

from tunekit.config import DataConfig, FullMethod, LoraMethod, ModelConfig
from tunekit.data import prepare_data
from tunekit.engine.batching import IGNORE, BatchStream, collate_packed, collate_padded, epoch_order, eval_batches
from tunekit.engine.loss import label_only_loss_sum
from tunekit.methods import build_method
from tunekit.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

# Every attention kernel the config offers that runs on CPU.
ATTENTION_KERNELS = [k for k in get_args(ModelConfig.model_fields["attn_implementation"].annotation)
                     if k != "flash_attention_2"]


@pytest.fixture(scope="module")
def examples(tokenizer, chat_jsonl):
    data = prepare_data(DataConfig(train=str(chat_jsonl), val_fraction=0.0, max_length=512), tokenizer)
    return data.train


def model_and_method(model_dir, attn: str, method_name: str):
    model = load_model(str(model_dir), attn_implementation=attn)
    method = build_method(FullMethod() if method_name == "full" else LoraMethod(r=4, alpha=8.0))
    model = method.apply(model)
    if method_name == "lora":
        # A fresh adapter is a no-op (lora_B = 0); give it random weights so its layers take part.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), method


def segment_means(method, model, batch, lengths: list[int]) -> list[float]:
    """Mean loss per target token of each sequence in a packed (1, sum(lengths)) batch."""
    with torch.no_grad():
        hidden = method.hidden_states(model, batch.input_ids, batch.position_ids, batch.attention_mask)
        head = method.lm_head(model)
        out, start = [], 0
        for n in lengths:
            s, count = label_only_loss_sum(hidden[:, start : start + n], head, batch.targets[:, start : start + n])
            out.append(float(s) / count)
            start += n
    return out


def alone_means(method, model, exs) -> list[float]:
    return [segment_means(method, model, collate_packed([e]), [len(e.input_ids)])[0] for e in exs]


@pytest.mark.parametrize("method_name", ["full", "lora"])
@pytest.mark.parametrize("attn", ATTENTION_KERNELS)
def test_packed_row_gives_each_sequence_its_own_loss(tiny_model_dir, examples, attn, method_name):
    model, method = model_and_method(tiny_model_dir, attn, method_name)
    exs = examples[:4]
    lengths = [len(e.input_ids) for e in exs]
    assert len(set(lengths)) > 1

    alone = alone_means(method, model, exs)
    packed = segment_means(method, model, collate_packed(exs), lengths)
    assert packed == pytest.approx(alone, abs=1e-5, rel=0)

    # Right-padded rows with an attention mask give the same losses as well.
    padded_batch = collate_padded(exs, pad_id=0)
    with torch.no_grad():
        hidden = method.hidden_states(model, padded_batch.input_ids, padded_batch.position_ids,
                                      padded_batch.attention_mask)
        head = method.lm_head(model)
        padded = []
        for i in range(len(exs)):
            s, count = label_only_loss_sum(hidden[i : i + 1], head, padded_batch.targets[i : i + 1])
            padded.append(float(s) / count)
    assert padded == pytest.approx(alone, abs=1e-5, rel=0)

    # The check can fail: one causal sequence over the whole row (positions not restarting) lets later
    # sequences attend to earlier ones, and their losses move far beyond the tolerance.
    leaky = collate_packed(exs)
    leaky.position_ids = torch.arange(sum(lengths)).unsqueeze(0)
    contaminated = segment_means(method, model, leaky, lengths)
    assert contaminated[0] == pytest.approx(alone[0], abs=1e-5)
    assert max(abs(c - a) for c, a in zip(contaminated[1:], alone[1:])) > 1e-3


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]


A = Ex([10, 11, 12, 13], [IGNORE, IGNORE, 12, 13])
B = Ex([20, 21, 22], [IGNORE, 21, 22])
C = Ex([30, 31], [30, 31])


def test_collate_packed_by_hand():
    b = collate_packed([A, B, C])
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 30, 31]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # targets[t] = labels[t + 1] within a sequence; the last token of each sequence predicts nothing,
    # in particular 13 never predicts 20 and 22 never predicts 30.
    assert b.targets.tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE, 31, IGNORE]]
    assert b.attention_mask is None
    assert (b.n_tokens, b.n_targets) == (9, 5)


def test_collate_padded_by_hand():
    b = collate_padded([A, B, C], pad_id=7)
    assert b.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 7], [30, 31, 7, 7]]
    assert b.targets.tolist() == [[IGNORE, 12, 13, IGNORE], [21, 22, IGNORE, IGNORE], [31, IGNORE, IGNORE, IGNORE]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3]] * 3
    assert (b.n_tokens, b.n_targets) == (9, 5)


def test_packed_real_examples_restart_positions_and_mask_boundaries(examples):
    exs = examples[:5]
    b = collate_packed(exs)
    pos, tgt = b.position_ids[0].tolist(), b.targets[0].tolist()
    start = 0
    for e in exs:
        n = len(e.input_ids)
        assert pos[start : start + n] == list(range(n))
        assert tgt[start : start + n - 1] == e.labels[1:]
        assert tgt[start + n - 1] == IGNORE  # boundary: never predicts the next sequence's first token
        start += n
    assert start == b.input_ids.shape[1] == b.n_tokens
    # Completion-only chat labels never label position 0, so every label becomes a target.
    assert b.n_targets == sum(e.n_label_tokens for e in exs)


# --- BatchStream ---------------------------------------------------------------------------------


def numbered(n: int) -> list[Ex]:
    """Example i is the one-token sequence [1000 + i] with 1 + i % 3 copies, so a batch can be decoded."""
    return [Ex([1000 + i] * (1 + i % 3), [1000 + i] * (1 + i % 3)) for i in range(n)]


def decode(batch) -> list[int]:
    """Example numbers in a packed batch, in order (a new example starts where position_ids is 0)."""
    ids, pos = batch.input_ids[0].tolist(), batch.position_ids[0].tolist()
    return [t - 1000 for t, p in zip(ids, pos) if p == 0]


def take(stream, k: int) -> list[list[int]]:
    return [decode(next(stream)) for _ in range(k)]


def test_stream_is_deterministic_and_seeded():
    exs = numbered(10)
    a = take(BatchStream(exs, 3, seed=5, packing=True, pad_id=0), 12)
    b = take(BatchStream(exs, 3, seed=5, packing=True, pad_id=0), 12)
    c = take(BatchStream(exs, 3, seed=6, packing=True, pad_id=0), 12)
    assert a == b
    assert a != c


def test_every_epoch_is_a_permutation_and_batches_span_epochs():
    n, bs = 10, 3
    batches = take(BatchStream(numbered(n), bs, seed=0, packing=True, pad_id=0), 10)  # 30 items: 3 epochs
    assert all(len(b) == bs for b in batches)  # the batch at an epoch end is filled from the next epoch
    flat = [i for b in batches for i in b]
    epochs = [flat[k * n : (k + 1) * n] for k in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in epochs}) == 3  # reshuffled every epoch


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_epoch_order_is_the_trainers_order(seed):
    """The same seed gives the order transformers' Trainer samples in (accelerate's seedable sampler)."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(data_source=range(50), data_seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert epoch_order(50, seed, epoch) == list(sampler)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 2, 3, 7])
def test_resume_mid_epoch_gives_the_same_next_batches(cut, packing):
    # n=10, batch 5: cut=2 ends exactly at the epoch boundary, cut=3 and 7 are in later epochs.
    exs = numbered(10)
    first = BatchStream(exs, 5, seed=3, packing=packing, pad_id=0)
    for _ in range(cut):
        next(first)
    state = copy.deepcopy(first.state_dict())
    expected = [next(first) for _ in range(6)]

    resumed = BatchStream(exs, 5, seed=3, packing=packing, pad_id=0)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(6)]
    for e, g in zip(expected, got):
        assert torch.equal(e.input_ids, g.input_ids)
        assert torch.equal(e.targets, g.targets)
        assert torch.equal(e.position_ids, g.position_ids)


def test_state_survives_a_torch_save_round_trip(tmp_path):
    stream = BatchStream(numbered(7), 2, seed=1, packing=True, pad_id=0)
    take(stream, 5)
    torch.save(stream.state_dict(), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    other = BatchStream(numbered(7), 2, seed=1, packing=True, pad_id=0)
    other.load_state_dict(loaded)
    assert take(other, 6) == take(stream, 6)


def test_padded_stream_batches_have_batch_size_rows():
    exs = numbered(5)
    batch = next(BatchStream(exs, 4, seed=0, packing=False, pad_id=9))
    rows = [int(r[0]) - 1000 for r in batch.input_ids]
    assert len(set(rows)) == 4
    lengths = [len(exs[i].input_ids) for i in rows]
    assert batch.input_ids.shape == (4, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.n_tokens == sum(lengths)


def test_empty_stream_is_an_error():
    with pytest.raises(ValueError, match="no training examples"):
        BatchStream([], 2, seed=0, packing=True, pad_id=0)


def test_eval_batches_keep_file_order_and_cover_everything():
    exs = numbered(7)
    got = [decode(b) for b in eval_batches(exs, 3, packing=True, pad_id=0)]
    assert got == [[0, 1, 2], [3, 4, 5], [6]]


def test_packed_attention_under_compile_does_not_recompile_per_length_set():
    """The per-sequence loop runs eagerly inside compiled code: new sequence lengths do not trigger recompiles
    (traced, it specialised on each row's lengths and hit dynamo's cache limit every step)."""
    import types

    from torch._dynamo.testing import CompileCounter

    from tunekit.attention import packed_causal_attention

    torch._dynamo.reset()
    module = types.SimpleNamespace(training=True)
    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=True)
    def layer(q, k, v, cu):
        out, _ = packed_causal_attention(module, q * 2, k, v, None, cu_seq_lens_q=cu)
        return out * 3

    torch.manual_seed(0)
    for lengths in ([5, 7, 4], [3, 3, 10], [16], [2, 9, 1, 4], [8, 8]):
        # (head counts unlike any len(cu): dynamo would tie equal sizes together and recompile when they part)
        q, k, v = torch.randn(1, 12, 16, 8), torch.randn(1, 6, 16, 8), torch.randn(1, 6, 16, 8)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        expected, _ = packed_causal_attention(module, q * 2, k, v, None, cu_seq_lens_q=cu)
        torch.testing.assert_close(layer(q, k, v, cu), expected * 3)
    assert counter.frame_count <= 4  # the graphs before and after the eager loop, once or twice each
    torch._dynamo.reset()
