"""The serving engine without HTTP: batched adapters, chunked prefill, sampling, stops, grammars, quantization.

References: HF transformers + peft greedy generation on the same fp32 weights (token for token)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from serve_fixtures import ADAPTER_SPECS, engine_for, lora_dir, make_lora  # noqa: F401 - fixtures

PROMPTS = ["Invoice INV-7 from ACME GmbH, total EUR 12.50, due 1 June 2025.", "hello", "Write a JSON object."]


def run_all(engine, jobs, timeout=120):
    """jobs: [(prompt ids, SamplingParams, adapter, grammar)] submitted together -> [(token ids, finish_reason)]."""
    results = [None] * len(jobs)
    done = [threading.Event() for _ in jobs]

    def sink(i):
        tokens = []

        def on_event(e):
            tokens.extend(e.token_ids)
            if e.finish_reason:
                results[i] = (tokens, e.finish_reason, e.error)
                done[i].set()
        return on_event

    for i, (ids, params, adapter, grammar) in enumerate(jobs):
        engine.submit(ids, params, adapter=adapter, on_event=sink(i), grammar=grammar)
    for d in done:
        assert d.wait(timeout), "a request never finished"
    return results


@pytest.fixture(scope="module")
def engine(tiny_model_dir, lora_dir):
    eng = engine_for(tiny_model_dir, max_num_seqs=6)
    for name in ADAPTER_SPECS:
        eng.load_adapter(name, lora_dir / name)
    eng.start()
    yield eng
    eng.stop()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_mixed_batch_of_four_adapters_and_base_matches_peft_token_for_token(engine, tiny_model_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunekit.serve.sampling import SamplingParams

    names = [None, *ADAPTER_SPECS]
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    jobs = [(p, SamplingParams(max_tokens=12, ignore_eos=True), a, None) for p in prompts for a in names]
    together = run_all(engine, jobs)  # 15 sequences over 6 slots: they queue, join and leave mid-flight
    for job, (tokens, reason, _) in zip(jobs, together):
        assert reason == "length" and len(tokens) == 12
    alone = [run_all(engine, [job])[0] for job in jobs[:5]]
    assert [a[0] for a in alone] == [t[0] for t in together[:5]]
    for (ids, _, adapter, _), (tokens, _, _) in zip(jobs, together):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        model = base if adapter is None else PeftModel.from_pretrained(base, str(lora_dir / adapter)).eval()
        assert tokens == hf_greedy(model, ids, 12), adapter


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir):
    from tunekit.serve.sampling import SamplingParams

    long_prompt = list(range(100, 190))
    outs = []
    for budget in (256, 7):
        eng = engine_for(tiny_model_dir, max_num_seqs=2, max_batched_tokens=budget)
        eng.start()
        try:
            outs.append(run_all(eng, [(long_prompt, SamplingParams(max_tokens=8, ignore_eos=True), None, None),
                                      ([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True), None, None)]))
        finally:
            eng.stop()
    assert [o[0] for o in outs[0]] == [o[0] for o in outs[1]]


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine):
    from tunekit.serve.sampling import SamplingParams

    ids = engine.encode_chat([{"role": "user", "content": "tell me something"}])
    p = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run_all(engine, [(ids, SamplingParams(**p), "ad-r4", None)])[0][0]
    crowd = run_all(engine, [(ids, SamplingParams(**p), "ad-r4", None)]
                    + [(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=i), "ad-r16", None) for i in range(4)])
    assert crowd[0][0] == alone
    other = run_all(engine, [(ids, SamplingParams(**{**p, "seed": 99}), "ad-r4", None)])[0][0]
    assert other != alone


def test_stop_strings_and_max_tokens(engine):
    from tunekit.serve.sampling import SamplingParams
    from tunekit.serve.sequence import visible_text

    ids = engine.encode_chat([{"role": "user", "content": "hello"}])
    sampled = dict(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)  # varied text, reproducible
    tokens = run_all(engine, [(ids, SamplingParams(**sampled), "ad-r16", None)])[0][0]
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    start = next(i for i in range(4, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
    stop = text[start:start + 3]
    got = []
    done = threading.Event()

    def on_event(e):
        got.append(e)
        if e.finish_reason:
            done.set()

    engine.submit(ids, SamplingParams(**sampled, stop=[stop]), adapter="ad-r16", on_event=on_event)
    assert done.wait(60)
    shown = "".join(e.text for e in got)
    assert got[-1].finish_reason == "stop" and shown == text[: text.find(stop)]
    assert visible_text("abc<|x", ["<|x|>"], final=False) == ("abc", False)
    assert visible_text("abc<|x|>def", ["<|x|>"], final=False) == ("abc", True)
    assert visible_text("ab\ufffd", [], final=False) == ("ab", False)


def test_json_schema_output_always_parses_and_matches(engine):
    from tunekit.serve.sampling import SamplingParams

    schema = {"type": "object", "properties": {"vendor": {"type": "string", "maxLength": 12},
                                               "total": {"type": "number"}},
              "required": ["vendor", "total"], "additionalProperties": False}
    grammar = engine.grammars.grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    ids = engine.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    jobs = [(ids, SamplingParams(max_tokens=60, temperature=1.0, seed=s), a, grammar)
            for s, a in enumerate([None, "ad-r4", "ad-r16"])]
    for tokens, reason, _ in run_all(engine, jobs):
        obj = json.loads(engine.tokenizer.decode(tokens, skip_special_tokens=True))
        assert reason == "stop" and set(obj) == {"vendor", "total"} and isinstance(obj["total"], (int, float))


def test_bad_schema_is_a_schema_error(engine):
    from tunekit.serve.structured import SchemaError

    with pytest.raises(SchemaError) as e:
        engine.grammars.grammar({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}})
    assert e.value.param.startswith("response_format")


def test_adapters_of_another_base_or_not_adapters_are_refused(tmp_path, tiny_model_dir, engine, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunekit.serve.adapters import AdapterError

    other = tmp_path / "other-base"
    with torch.random.fork_rng():
        AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)).save_pretrained(other)
    make_lora(other, tmp_path / "foreign", 4, 8, False, {}, seed=0)
    cfg = json.loads((tmp_path / "foreign" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # only the shapes tell
    (tmp_path / "foreign" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="another base model"):
        engine.load_adapter("foreign", tmp_path / "foreign")
    (tmp_path / "junk").mkdir()
    with pytest.raises(AdapterError, match="not an adapter"):
        engine.load_adapter("junk", tmp_path / "junk")
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("ad-r4", tmp_path / "junk")


def test_lru_budget_evicts_the_least_recent_unpinned(tiny_model_dir, lora_dir):
    from tunekit.serve.adapters import AdapterError

    eng = engine_for(tiny_model_dir, max_adapters=2)
    eng.load_adapter("a", lora_dir / "ad-r4", pin=True)
    eng.load_adapter("b", lora_dir / "ad-r16")
    eng.load_adapter("c", lora_dir / "ad-ranks")  # evicts b, not the pinned a
    assert set(eng.adapters) == {"a", "c"}
    eng.budget.pinned.add("c")
    with pytest.raises(AdapterError, match="budget"):
        eng.load_adapter("d", lora_dir / "ad-r4")


def test_merged_lane_serves_dora_like_peft(tmp_path, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.serve.sampling import SamplingParams

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "dora")
    eng = engine_for(tiny_model_dir)
    entry = eng.load_adapter("dora", tmp_path / "dora")
    assert entry.kind == "merged"
    eng.start()
    try:
        ids = eng.encode_chat([{"role": "user", "content": "hello"}])
        got = run_all(eng, [(ids, SamplingParams(max_tokens=10, ignore_eos=True), "dora", None)])[0][0]
    finally:
        eng.stop()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "dora"))
    assert got == hf_greedy(ref.eval(), ids, 10)


def test_int8_weights_stay_close_to_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunekit.serve.runner import ModelRunner, Work

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = list(range(200, 240))
    logits = []
    for quant in (None, "int8"):
        runner = ModelRunner(hf, torch.float32, quantize=quant, max_slots=1)
        logits.append(runner.forward([Work(0, 0, ids, None, True)])[0])
    kl = torch.nn.functional.kl_div(logits[1].log_softmax(-1), logits[0].log_softmax(-1), log_target=True,
                                    reduction="sum")
    assert 0 < kl < 1e-2
    assert ModelRunner(hf, torch.float32, "int8").linear_bytes < 0.3 * ModelRunner(hf, torch.float32).linear_bytes


def test_lora_kernel_alternatives_agree():
    from tunekit.serve.lora_batch import LoraBank, LoraWeights, apply_gathered, apply_padded_bmm, apply_segments_

    torch.manual_seed(0)
    x, y = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 24, dtype=torch.float64)
    a, b = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 24, 4, dtype=torch.float64)
    segs = [(0, 0, 3), (2, 3, 4), (1, 4, 10)]
    index = torch.tensor([0, 0, 0, 2, 1, 1, 1, 1, 1, 1])
    ref = y + torch.einsum("no,n->no", torch.einsum("nor,nr->no", b[index], torch.einsum("nri,ni->nr", a[index], x)),
                           torch.ones(10, dtype=torch.float64))
    weights = [LoraWeights(str(i), {(0, "q"): (a[i], b[i])}, {}) for i in range(3)]
    seg = apply_segments_(y.clone(), x, (0, "q"), [(weights[i], s, e) for i, s, e in segs])
    bank = LoraBank(weights, 1, {"q": ("q", None, None)}, {"q": 24}, torch.float64)
    stacked = bank.apply_(y.clone(), x, 0, "q", bank.masks_for(index, torch.float64))
    for got in (seg, stacked, apply_gathered(y, x, a, b, index), apply_padded_bmm(y, x, a, b, segs)):
        torch.testing.assert_close(got, ref)


def test_stacked_lora_in_the_serving_dtype_follows_the_float64_reference():
    """The bf16 path (oneDNN blocked factors where the CPU has native bf16) within bf16 rounding of float64."""
    from tunekit.serve.lora_batch import LoraBank, LoraWeights

    torch.manual_seed(1)
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.randn(10, 96, dtype=torch.float64)
    a, b = torch.randn(3, 4, 64, dtype=torch.float64) / 8, torch.randn(3, 96, 4, dtype=torch.float64) / 2
    index = torch.tensor([0, 0, 0, 2, 1, 1, 1, -1, -1, 1])  # -1: base-model tokens, no delta
    ref = y.clone()
    for n, i in enumerate(index.tolist()):
        if i >= 0:
            ref[n] += b[i] @ (a[i] @ x[n])
    weights = [LoraWeights(str(i), {(0, "q"): (a[i], b[i])}, {}) for i in range(3)]
    bank = LoraBank(weights, 1, {"q": ("q", None, None)}, {"q": 96}, torch.bfloat16)
    got = bank.apply_(y.bfloat16(), x.bfloat16(), 0, "q", bank.masks_for(index, torch.bfloat16))
    torch.testing.assert_close(got.double(), ref, atol=0.05, rtol=0.02)
    assert torch.equal(got[7:9].double(), y[7:9].bfloat16().double())  # base rows untouched


def test_schema_grammar_accepts_json_dumps_layout_token_for_token(engine):
    """Constrained output is laid out as json.dumps writes it (what fine-tuning data teaches), not compact."""
    from llguidance import LLMatcher

    schema = {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "number"},
                                               "due": {"type": ["string", "null"]}},
              "required": ["vendor", "total", "due"], "additionalProperties": False}
    grammar = engine.grammars.grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    text = json.dumps({"vendor": "ACME GmbH", "total": 12.5, "due": None})
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = LLMatcher(engine.grammars.ll_tokenizer, grammar, log_level=0)
    assert matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_incremental_detokenizer_equals_decoding_the_whole_output(tokenizer):
    """Token by token, the text built from short windows equals decoding everything at once: multi-byte
    characters split across tokens (emoji, CJK, accents), special tokens skipped, spaces and newlines."""
    from tunekit.serve.sampling import SamplingParams
    from tunekit.serve.sequence import Sequence, detokenize

    text = "Größe 5 € 🙂🙂 日本語 <|im_end|> \n\n  two  spaces {\"a\": 1} ☕️ end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = Sequence([1], SamplingParams(), None)
    seen = []
    for k, token in enumerate(ids):
        seq.output_ids.append(token)
        detokenize(tokenizer, seq, final=k == len(ids) - 1)
        seen.append(seq.text)
        assert "\ufffd" not in seq.text or k == len(ids) - 1
    assert seq.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert any(a == b for a, b in zip(seen, seen[1:]))  # some steps waited for the rest of a character
