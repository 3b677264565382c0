"""The `tunekit` command through `tunekit.cli.main`: config printing, help, exit codes, and a real run folder
checked against independent numbers (parameter counts, validation loss, greedy decoding)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import LORA_RUN, TINY, base_overrides, short_chat_records, torch_globals_preserved, write_jsonl
from tunekit.cli import main
from tunekit.config import METHODS, Config, LoraMethod, load_config
from tunekit.data import prepare_data
from tunekit.demo.scoring import parse_json_output, score_predictions
from tunekit.engine.batching import IGNORE, collate_padded
from tunekit.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

SECTIONS = ("model", "data", "optim", "train")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- configuration commands ------------------------------------------------------------------------


def test_print_config_shows_every_effective_value(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl", "max_length": 256}, "train": {"max_steps": 9}}))
    rc, out, _ = run(capsys, "train", "--config", str(path), "--train.max_steps", "7", "--method", "full",
                     "--method.freeze_embeddings", "--optim.lr=1e-3", "--optim.betas", "[0.8, 0.9]",
                     "--data.packing", "false",
                     "--resume", "--print-config")
    assert rc == 0
    expected = Config().model_dump(mode="json")
    expected["data"].update(train="d.jsonl", max_length=256, packing=False)
    expected["train"].update(max_steps=7, resume=True)
    expected["method"] = {"name": "full", "freeze_embeddings": True}
    expected["optim"].update(lr=1e-3, betas=[0.8, 0.9])
    assert yaml.safe_load(out) == expected


def test_short_aliases(capsys):
    rc, out, _ = run(capsys, "train", "--model", "m-dir", "--data", "d.jsonl", "--output", "o", "--method", "full",
                     "--resume", "false", "--print-config")
    assert rc == 0
    cfg = yaml.safe_load(out)
    assert (cfg["model"]["name"], cfg["data"]["train"], cfg["train"]["output_dir"]) == ("m-dir", "d.jsonl", "o")
    assert cfg["method"]["name"] == "full" and cfg["train"]["resume"] is False


def option_lines(help_text: str) -> dict[str, str]:
    """{flag: rest of its line} for every `  --flag ...` line of the help."""
    lines = {}
    for line in help_text.splitlines():
        m = re.match(r"\s+--(\S+)\s+(.*)$", line)
        if m:
            lines[m.group(1)] = m.group(2)
    return lines


def test_help_lists_every_field_with_description_and_default(capsys):
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0
    options = option_lines(out)
    for section in SECTIONS:
        cls = Config.model_fields[section].annotation
        for name, field in cls.model_fields.items():
            line = options.get(f"{section}.{name}")
            assert line is not None, f"--{section}.{name} missing from --help"
            assert field.description and field.description in line
            default = field.default_factory() if field.default_factory else field.default
            assert f"[default: {default!r}]" in line
    for method, cls in METHODS.items():
        for name, field in cls.model_fields.items():
            if field.description:
                assert field.description in out, f"method {method}: {name}"
    for flag in ("--config", "--print-config", "--resume"):
        assert flag in out


def test_every_flag_in_help_is_accepted_and_described(capsys):
    _, out, _ = run(capsys, "train", "--help")
    defaults = Config().model_dump(mode="json")
    failures = []
    for flag, line in option_lines(out).items():
        if not line.split("[default:")[0].strip():
            failures.append(f"--{flag}: no description")
        m = re.search(r"\((\w+)(?:, \w+)* only\)", line)  # "(lora only)" or "(lora, qlora only)"
        if m:  # the default of that method's option, typed with the method selected first
            value = METHODS[m.group(1)]().model_dump(mode="json")[flag.split(".")[1]]
            prefix = ["--method", m.group(1)]
        else:
            section, key = flag.split(".")
            if defaults[section] is None:  # an optional section (distill): its own defaults
                from tunekit.config import section_type

                defaults[section] = section_type(Config.model_fields[section].annotation)().model_dump(mode="json")
            value, prefix = defaults[section][key], []
        if main(["train", *prefix, f"--{flag}", json.dumps(value), "--print-config"]) != 0:
            failures.append(f"--{flag} {json.dumps(value)}: rejected")
        capsys.readouterr()
    assert not failures, failures


@pytest.mark.parametrize("argv, words", [
    (["train", "--bogus", "1"], ["--bogus", "--config", "--print-config"]),
    (["train", "stray"], ["'stray'"]),
    (["train", "--train.bogus", "1", "--print-config"], ["train.bogus", "batch_size, compile, country_iso_code, device"]),
    (["train", "--train.max_steps", "many", "--print-config"], ["train.max_steps"]),
    (["train", "--config", "/no/such/file.yaml"], ["/no/such/file.yaml", "not found"]),
])
def test_bad_train_options_exit_2_with_a_message(capsys, argv, words):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("tunekit: ")
    for w in words:
        assert w in err
    assert "Traceback" not in err and out == ""


def test_missing_training_file_exits_2_naming_it(capsys, tmp_path, tiny_model_dir):
    missing = tmp_path / "nope.jsonl"
    overrides = base_overrides(tiny_model_dir, missing, tmp_path / "run")
    rc, _, err = run(capsys, "train", *[f"--{k}={v}" for k, v in overrides.items()])
    assert rc == 2 and str(missing) in err


def test_no_command_and_unknown_command(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and "COMMAND" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_generate_needs_a_prompt(capsys):
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--model", "x"])


# --- a real run through the CLI (the shared `lora_run` fixture) ------------------------------------


def closed_form_lora_params(r: int) -> int:
    h, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + (h + inter) + (h + inter) + (inter + h)
    return TINY["num_hidden_layers"] * r * per_layer


def test_train_writes_a_complete_run_folder(lora_run, tiny_model_dir, chat_jsonl):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "config.yaml", "metrics.jsonl", "README.md", "result.json"):
        assert (lora_run / name).is_file(), name

    adapter_cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == LORA_RUN["method.r"] and adapter_cfg["lora_alpha"] == LORA_RUN["method.alpha"]
    assert sorted(adapter_cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])

    # config.yaml is the full resolved config of the run.
    expected = load_config(None, {**base_overrides(tiny_model_dir, chat_jsonl, lora_run), **LORA_RUN})
    assert load_config(lora_run / "config.yaml") == expected

    result = json.loads((lora_run / "result.json").read_text())
    metrics = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    steps = LORA_RUN["train.max_steps"]
    assert result["steps"] == steps and not result["interrupted"]
    assert result["trainable_params"] == closed_form_lora_params(LORA_RUN["method.r"])
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, steps + 1))
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    assert [s for s, _ in evals] == [0, 2, 4, steps]
    assert result["eval_loss_before"] == evals[0][1] and result["eval_loss_after"] == evals[-1][1]
    assert result["tokens_seen"] == sum(m["tokens"] for m in metrics if "loss" in m)

    card = (lora_run / "README.md").read_text()
    assert f"{result['trainable_params']:,}" in card and f"{result['total_params']:,}" in card
    assert f"{result['eval_loss_before']:.4f} before -> {result['eval_loss_after']:.4f} after" in card


def validation_loss(model, examples, pad_id) -> float:
    """Mean next-token loss over all labelled tokens, through transformers' own `labels=` loss."""
    batch = collate_padded(examples, pad_id)
    labels = torch.full(batch.input_ids.shape, IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss)


def test_reported_eval_losses_match_transformers(lora_run, tiny_model_dir, tokenizer):
    from peft import PeftModel

    cfg = load_config(lora_run / "config.yaml")
    val = prepare_data(cfg.data, tokenizer).validation
    assert len(val) == round(0.2 * 24)
    result = json.loads((lora_run / "result.json").read_text())
    before = validation_loss(load_model(str(tiny_model_dir)), val, tokenizer.pad_token_id)
    after = validation_loss(PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(lora_run)), val,
                            tokenizer.pad_token_id)
    assert result["eval_loss_before"] == pytest.approx(before, rel=1e-5)
    assert result["eval_loss_after"] == pytest.approx(after, rel=1e-5)
    assert after < before - 1e-3  # it learned something, so the two checks are not the same check


# --- generate / eval -------------------------------------------------------------------------------


def greedy(model, tokenizer, messages, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time without a cache or padding: the reference for `generate`."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    new = []
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def adapted(lora_run, tiny_model_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(lora_run))


def test_generate_prints_the_greedy_reply(capsys, lora_run, tiny_model_dir, tokenizer, adapted):
    with torch_globals_preserved():
        rc, out, _ = run(capsys, "generate", "--model", str(tiny_model_dir), "--adapter", str(lora_run),
                         "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu", "--dtype", "float32")
    assert rc == 0
    expected = greedy(adapted, tokenizer, [{"role": "user", "content": "hi"}], 5)
    assert expected  # the trained tiny model does say something
    assert out == expected + "\n"


def test_chat_keeps_history_and_resets(capsys, monkeypatch, lora_run, tiny_model_dir, tokenizer, adapted):
    typed = iter(["hi", "/reset", "hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    with torch_globals_preserved():
        rc, out, _ = run(capsys, "chat", "--model", str(tiny_model_dir), "--adapter", str(lora_run),
                         "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu", "--dtype", "float32")
    assert rc == 0
    expected = greedy(adapted, tokenizer, [{"role": "user", "content": "hi"}], 5)
    replies = [line[len("bot> "):] for line in out.splitlines() if line.startswith("bot> ")]
    assert replies == [expected, expected]  # after /reset the same first turn gives the same reply


@pytest.fixture(scope="module")
def eval_records():
    return short_chat_records(4, seed=11)


def test_eval_reports_exact_match_against_greedy_predictions(capsys, tmp_path, lora_run, tiny_model_dir, tokenizer,
                                                            adapted, eval_records):
    data = write_jsonl(tmp_path / "test.jsonl", eval_records)
    preds_file = tmp_path / "preds.jsonl"
    with torch_globals_preserved():
        rc, out, _ = run(capsys, "eval", "--model", str(tiny_model_dir), "--adapter", str(lora_run),
                         "--data", str(data), "--max-new-tokens", "6", "--device", "cpu", "--dtype", "float32",
                         "--output", str(preds_file))
    assert rc == 0
    prompts = [r["messages"][:-1] for r in eval_records]
    references = [r["messages"][-1]["content"] for r in eval_records]
    expected_preds = [greedy(adapted, tokenizer, p, 6) for p in prompts]
    rows = [json.loads(line) for line in preds_file.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == expected_preds  # batched, left-padded generation = one by one
    assert [r["reference"] for r in rows] == references

    scores = score_predictions(expected_preds, references)
    header, _, row = out.splitlines()[:3]
    assert header.split() == ["model", "dtype", "n", "exact_match", "json_valid"]
    assert row.split()[-3:] == ["4", f"{100 * scores['exact_match']:.1f}%", f"{100 * scores['json_valid']:.1f}%"]
    assert all(parse_json_output(r) is not None for r in references)  # the JSON-aware path was taken
    assert "field" in out  # per-field table for JSON answers


def test_eval_exact_match_counts_matching_text_answers(capsys, tmp_path, lora_run, tiny_model_dir, tokenizer, adapted,
                                                       eval_records):
    # Plain-text answers: two references are what the model will say, two are not -> 50%.
    prompts = [r["messages"][:-1] for r in eval_records]
    preds = [greedy(adapted, tokenizer, p, 6) for p in prompts]
    answers = [preds[0], "certainly not this", preds[2], "nor this"]
    records = [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers)]
    data = write_jsonl(tmp_path / "text.jsonl", records)
    with torch_globals_preserved():
        rc, out, _ = run(capsys, "eval", "--model", str(tiny_model_dir), "--adapter", str(lora_run),
                         "--data", str(data), "--max-new-tokens", "6", "--device", "cpu")
    assert rc == 0
    row = out.splitlines()[2].split()
    assert row[-3:] == ["4", "50.0%", "-"]
