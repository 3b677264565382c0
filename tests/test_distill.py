"""tunekit shrink and tunekit distill (offline, logit, on-policy) on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, torch_globals_preserved

from tunekit.config import load_config
from tunekit.distill import DistillError, distill, layers_to_keep, shrink
from tunekit.distill.objective import prompt_of, sequences_of
from tunekit.engine.batching import IGNORE, collate_packed, collate_padded


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 6-layer tiny Llama (random weights) with the real SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("teacher6")
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **{**TINY, "num_hidden_layers": 6})
    with torch_globals_preserved():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "s"
    with torch_globals_preserved():
        shrink(str(teacher_dir), str(out), every=3)
    return out


def distill_config(make_config, out, teacher, student, **distill):
    cfg = make_config(out, {"model.name": str(student), "method.name": "full", "optim.lr": 1e-3,
                            "train.max_steps": 3})
    tree = cfg.model_dump()
    tree["distill"] = {"teacher": str(teacher), **distill}
    return load_config(None, {f"{s}.{k}": v for s, sec in tree.items() if sec for k, v in sec.items()})


# --- shrink ----------------------------------------------------------------------------------------------------
def test_layers_to_keep_spreads_evenly_with_first_and_last():
    assert layers_to_keep(30, every=3) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layers_to_keep(6, every=2) == [0, 2, 5]  # round(6/2) = 3 layers
    assert layers_to_keep(4, every=1) == [0, 1, 2, 3]
    assert layers_to_keep(6, layers=[0, -1]) == [0, 5]
    with pytest.raises(DistillError, match="layers 0..5"):
        layers_to_keep(6, layers=[7])
    with pytest.raises(DistillError, match="exactly one"):
        layers_to_keep(6)


def test_shrunk_student_holds_the_kept_layers_and_generates_with_a_cache(teacher_dir, student_dir):
    from transformers import AutoModelForCausalLM

    report = json.loads((student_dir / "shrink.json").read_text())
    assert report["kept_layers"] == [0, 5]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    assert report["student_params"] == sum(p.numel() for p in student.parameters())
    for j, i in enumerate(report["kept_layers"]):
        torch.testing.assert_close(student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)
        assert student.model.layers[j].self_attn.layer_idx == j  # the KV cache is indexed by it
    # Greedy decoding with the KV cache equals argmax of full forwards (a stale layer_idx would break the cache).
    ids = torch.tensor([[1, 17, 300, 42, 5]])
    out = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, student(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


# --- helpers of on-policy --------------------------------------------------------------------------------------
class Ex:
    def __init__(self, ids, labels):
        self.input_ids, self.labels = ids, labels


@pytest.mark.parametrize("packed", [True, False])
def test_prompts_are_recovered_from_packed_and_padded_batches(packed):
    exs = [Ex([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5]), Ex([6, 7, 8], [IGNORE, 7, 8])]
    batch = collate_packed(exs) if packed else collate_padded(exs, pad_id=0)
    seqs = sequences_of(batch)
    assert [s[0] for s in seqs] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert [prompt_of(*s) for s in seqs] == [[1, 2, 3], [6]]


# --- errors before training ------------------------------------------------------------------------------------
def test_a_teacher_with_another_tokenizer_is_refused_by_name(make_config, tmp_path, student_dir, teacher_dir, tokenizer):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    for f in teacher_dir.iterdir():
        (other / f.name).parent.mkdir(parents=True, exist_ok=True)
        (other / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.add_tokens(["<invoice_total>"])
    tok.save_pretrained(other)
    cfg = distill_config(make_config, tmp_path / "run", other, student_dir, mode="logit")
    with pytest.raises(DistillError, match=r"different tokenizers .*<invoice_total>.*mode offline"):
        distill(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_over_free_memory_is_caught_by_the_planner(make_config, tmp_path, student_dir, teacher_dir,
                                                             monkeypatch):
    import tunekit.planner as planner
    from tunekit.planner import PlanError

    monkeypatch.setattr(planner, "free_memory_bytes", lambda device="cpu": 2**20)
    loaded = []
    monkeypatch.setattr("tunekit.distill.objective.load_teacher", lambda *a, **k: loaded.append(a))
    cfg = distill_config(make_config, tmp_path / "run", teacher_dir, student_dir, mode="logit")
    with pytest.raises(PlanError, match=r"distillation needs about .* teacher .* GiB is free"):
        distill(cfg)
    assert not loaded


def test_offline_mode_through_tunekit_train_says_to_use_distill(make_config, tmp_path, student_dir, teacher_dir):
    from tunekit.engine import train

    cfg = distill_config(make_config, tmp_path / "run", teacher_dir, student_dir, mode="offline")
    with pytest.raises(DistillError, match="tunekit distill"):
        train(cfg)


# --- training ----------------------------------------------------------------------------------------------------
def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kd_on", ["completion", "all"])
def test_logit_kd_with_alpha_one_is_plain_sft(make_config, tmp_path, student_dir, teacher_dir, kd_on):
    """alpha=1 leaves only the CE term: the same losses as `tunekit train` (a check of the KD path's CE, which
    stays on the labels when the KD term covers every token)."""
    from tunekit.engine import train

    with torch_globals_preserved():
        sft = train(make_config(tmp_path / "sft", {"model.name": str(student_dir), "method.name": "full",
                                                   "optim.lr": 1e-3, "train.max_steps": 3}))
        kd = distill(distill_config(make_config, tmp_path / "kd", teacher_dir, student_dir, mode="logit", alpha=1.0,
                                    kd_on=kd_on))
    a = [m["loss"] for m in metrics(Path(sft.run_dir)) if "loss" in m]
    b = [m["loss"] for m in metrics(Path(kd.run_dir)) if "loss" in m]
    assert len(a) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kd_on", ["completion", "all"])
def test_logit_kd_of_a_model_into_itself_has_zero_divergence(make_config, tmp_path, student_dir, kd_on):
    with torch_globals_preserved():
        result = distill(distill_config(make_config, tmp_path / "kd", student_dir, student_dir, mode="logit",
                                        alpha=0.5, divergence="jsd", temperature=2.0, kd_on=kd_on,
                                        **{"max_new_tokens": 8}))
    first = next(m for m in metrics(Path(result.run_dir)) if "loss" in m)
    assert abs(first["loss_kd"]) < 1e-4  # step 1: the student is still the teacher
    assert first["loss"] == pytest.approx(0.5 * first["loss_ce"], rel=1e-4)
    card = (Path(result.run_dir) / "README.md").read_text()
    assert "| Distillation | logit |" in card and "jsd (beta=0.5)" in card


def test_logit_kd_resumes_to_the_same_losses(make_config, tmp_path, student_dir, teacher_dir):
    def cfg(out, steps, resume=False):
        c = distill_config(make_config, out, teacher_dir, student_dir, mode="logit", alpha=0.3)
        # constant LR: a 2-step run then has the schedule of the first 2 steps of the 4-step one
        return c.model_copy(update={"train": c.train.model_copy(update={"max_steps": steps, "save_every": 2,
                                                                         "resume": resume}),
                                    "optim": c.optim.model_copy(update={"schedule": "constant"})})

    with torch_globals_preserved():
        full = distill(cfg(tmp_path / "a", 4))
        distill(cfg(tmp_path / "b", 2))
        resumed = distill(cfg(tmp_path / "b", 4, resume=True))
    assert resumed.steps == 4
    a = [m["loss"] for m in metrics(Path(full.run_dir)) if "loss" in m]
    b = [m["loss"] for m in metrics(Path(resumed.run_dir)) if "loss" in m]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_on_policy_trains_on_the_students_samples(make_config, tmp_path, student_dir, teacher_dir, estimator):
    with torch_globals_preserved():
        result = distill(distill_config(make_config, tmp_path / "op", teacher_dir, student_dir, mode="on-policy",
                                        on_policy_loss=estimator, max_new_tokens=6))
    rows = [m for m in metrics(Path(result.run_dir)) if "loss" in m]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in rows)
    assert all("loss_ce" not in m for m in rows)  # no gold labels on sampled completions
    card = (Path(result.run_dir) / "README.md").read_text()
    assert "| Micro-batches sampled / gold | 3 / 0 |" in card and f"| On-policy loss | {estimator} |" in card


def test_on_policy_warm_up_trains_on_gold_first_then_samples(make_config, tmp_path, student_dir, teacher_dir):
    """The warm-up steps are logit-mode steps (same losses), the steps after it sample."""
    with torch_globals_preserved():
        logit = distill(distill_config(make_config, tmp_path / "kd", teacher_dir, student_dir, mode="logit",
                                       divergence="reverse_kl", alpha=0.4))
        op = distill(distill_config(make_config, tmp_path / "op", teacher_dir, student_dir, mode="on-policy",
                                    alpha=0.4, on_policy_warmup_steps=2, max_new_tokens=6))
    a = [m for m in metrics(Path(logit.run_dir)) if "loss" in m]
    b = [m for m in metrics(Path(op.run_dir)) if "loss" in m]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in b[:2]]), torch.tensor([m["loss"] for m in a[:2]]),
                               rtol=1e-5, atol=1e-6)
    assert "loss_ce" in b[1] and "loss_ce" not in b[2]  # step 3 trains on the student's own samples
    card = (Path(op.run_dir) / "README.md").read_text()
    assert "| Micro-batches sampled / gold | 1 / 2 |" in card and "| Gold-only warm-up steps | 2 |" in card


def test_offline_writes_resumable_teacher_data_with_provenance_then_trains(make_config, tmp_path, student_dir,
                                                                           teacher_dir, chat_jsonl):
    from tunekit.distill.teacher_data import write_teacher_data

    cfg = distill_config(make_config, tmp_path / "off", teacher_dir, student_dir, mode="offline", max_new_tokens=5,
                         generate_batch_size=4, teacher_temperature=1.0)
    with torch_globals_preserved():
        result = distill(cfg)
    data = tmp_path / "off" / "teacher_data.jsonl"
    rejected = tmp_path / "off" / "teacher_data.rejected.jsonl"  # empty replies of the random teacher
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    empty = [json.loads(x) for x in rejected.read_text().splitlines()]
    n = len(chat_jsonl.read_text().splitlines())
    assert sorted(r["provenance"]["index"] for r in rows + empty) == list(range(n))
    assert len(rows) > n // 2 and all(r["messages"][-1]["content"].strip() for r in rows)
    assert rows[0]["provenance"]["teacher"] == str(teacher_dir) and rows[0]["provenance"]["line"] >= 1
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    meta = json.loads(data.with_name(data.name + ".meta.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 5 and "finished" in meta
    assert load_config(Path(result.run_dir) / "config.yaml").data.train == str(data)

    # Killed mid-write: two whole rows and a torn third; a rerun answers only the missing prompts.
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:2]) + lines[2][:10])
    with torch_globals_preserved():
        write_teacher_data(cfg.distill, cfg.data.train, str(data), device="cpu", progress=False)
    again = data.read_text().splitlines(keepends=True)
    assert again[:2] == lines[:2]
    indices = [json.loads(x)["provenance"]["index"] for x in again + rejected.read_text().splitlines()]
    assert sorted(indices) == list(range(n))
    # Other settings on an existing file: refused rather than mixed.
    changed = cfg.distill.model_copy(update={"max_new_tokens": 7})
    with pytest.raises(DistillError, match="other settings"):
        write_teacher_data(changed, cfg.data.train, str(data), device="cpu", progress=False)


def test_study_reuses_a_run_whose_config_differs_only_in_bookkeeping():
    import yaml

    from tunekit.distill.experiment import base_tree, distill_section, same_run

    tree = base_tree("student", Path("t.jsonl"), Path("v.jsonl"), Path("out"), 40, 8, 1e-3, threads=1)
    tree["distill"] = distill_section("on-policy", "teacher", "adapter", 40)
    text = yaml.safe_dump(tree)
    assert tree["distill"]["on_policy_warmup_steps"] == 20 and tree["train"]["resume"] is True
    for key, value in (("save_every", 0), ("threads", 2), ("progress", False), ("resume", False)):
        assert same_run(text, yaml.safe_dump({**tree, "train": {**tree["train"], key: value}}))
    assert not same_run(text, yaml.safe_dump({**tree, "optim": {**tree["optim"], "lr": 2e-4}}))
    assert not same_run(text, yaml.safe_dump({**tree, "distill": {**tree["distill"], "alpha": 0.4}}))
