"""Inference: load a base model with an optional adapter, and generate replies for chat conversations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .engine.device import keep_freed_memory, pick_device, resolve_precision
from .models import DTYPES, load_model, load_tokenizer


def inference_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 where the device computes it natively (prefill is matmul-bound), else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32
    return DTYPES[dtype]


def tokenizer_source(model: str, adapter: str | None) -> str:
    """Where the tokenizer of model + adapter comes from: the adapter / run folder when it saved one, else the model."""
    return str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model


def left_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, max_len), left-padded: every row's last token sits at the same position,
    where generation starts."""
    width = max(len(x) for x in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, x in enumerate(sequences):
        ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
    return ids, mask


def load_for_inference(model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                       merge: bool = False):
    """(model, tokenizer) ready for generation. `adapter` is a tunekit run folder or any PEFT adapter folder.

    The adapter is attached to fp32 base weights; with merge=True it is folded into them (in fp32) before the
    model is cast to the inference dtype, so a merged bf16 model rounds W + BA once rather than each term.
    """
    dev = pick_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    base = load_model(model, dtype="float32", device=dev)
    if adapter is not None:
        base = attach_adapter(base, Path(adapter), dev, merge)
    tokenizer = load_tokenizer(tokenizer_source(model, adapter))
    base = base.to(inference_dtype(dtype, dev))
    base.eval()
    return base, tokenizer


def attach_adapter(base, path: Path, dev: torch.device, merge: bool):
    """`base` with the run folder / PEFT adapter at `path` attached, folded in when `merge` and the method can.

    Methods that cannot merge (prefix, prompt, p-tuning, bottleneck adapters) stay attached unmerged, with a note.
    """
    from .methods import MethodError, method_for_folder
    from .methods.base import METHOD_FILE

    if not ((path / "adapter_config.json").exists() or (path / METHOD_FILE).exists()):
        raise FileNotFoundError(f"{path}: no adapter_config.json; pass a tunekit run folder or a PEFT adapter "
                                f"(a full fine-tune is a model folder: use it as --model)")
    try:
        method = method_for_folder(path)
    except MethodError:
        if not (path / "adapter_config.json").exists():
            raise
        method = None  # a PEFT method tunekit does not train (LoHa, ...): peft alone loads and merges it
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        # The plain PEFT path (also for QLoRA runs: the adapter on the unquantized base).
        model = PeftModel.from_pretrained(base, str(path)).to(dev)
    else:
        model = method.load(base, path).to(dev)
    if not merge:
        return model
    if method is not None and not method.can_merge:
        print(f"[tunekit] method {method.name!r} cannot be merged into the base weights: running it unmerged",
              file=sys.stderr, flush=True)
        return model
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else method.merge(model)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token when it differs (ChatML's <|im_end|>, Llama-3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


class JsonObjectClosed(StoppingCriteria):
    """A `generate` stopping criterion: a row is done once its reply holds one whole top-level JSON object.

    It scans each row's new tokens for `{` ... the matching `}`, ignoring braces inside strings (and escaped
    quotes inside those); a reply that opened a ``` fence before the object runs on to the closing fence. Where
    every answer is a JSON object, the tokens a model writes after it (an end-of-turn it has not learnt yet, or
    a base model's prose) are wasted work: the row leaves the batch. Text before the first `{` is not a reason
    to stop; a row that never opens an object runs to max_new_tokens.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.seen = tokenizer, prompt_width
        self.rows: list[dict] | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        # input_ids: (B, prompt_width + generated so far); usually one new column per call.
        if self.rows is None:
            self.rows = [self.start() for _ in range(input_ids.shape[0])]
        for col in range(self.seen, input_ids.shape[1]):
            for row, state in enumerate(self.rows):
                if not state["done"]:
                    self.scan(state, self.tokenizer.decode([int(input_ids[row, col])]))
        self.seen = input_ids.shape[1]
        return torch.tensor([state["done"] for state in self.rows], dtype=torch.bool, device=input_ids.device)

    @staticmethod
    def start() -> dict:
        # closed: the object's final } was seen; ticks: backticks seen before the object / after it.
        return {"depth": 0, "in_string": False, "escaped": False, "closed": False, "fenced": False,
                "ticks": 0, "done": False}

    @staticmethod
    def scan(st: dict, text: str) -> None:
        for ch in text:
            if st["done"]:
                return
            if st["closed"]:  # only a fenced reply gets here: wait for its closing ```
                if ch == "`":
                    st["ticks"] += 1
                    st["done"] = st["ticks"] == 3
                elif not ch.isspace():
                    st["done"] = True  # anything else makes the reply unscorable anyway
            elif st["in_string"]:
                if st["escaped"]:
                    st["escaped"] = False
                elif ch == "\\":
                    st["escaped"] = True
                elif ch == '"':
                    st["in_string"] = False
            elif ch == '"' and st["depth"]:
                st["in_string"] = True
            elif ch == "`" and not st["depth"]:
                st["fenced"] = True
            elif ch == "{":
                st["depth"] += 1
            elif ch == "}" and st["depth"]:
                st["depth"] -= 1
                if not st["depth"]:
                    st["closed"], st["ticks"] = True, 0
                    st["done"] = not st["fenced"]


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, progress: bool = False,
             stop_after_json: bool = False) -> list[str]:
    """One reply per conversation (each a list of {role, content}); greedy when temperature == 0.

    stop_after_json: end each reply at the close of its first top-level JSON object (see JsonObjectClosed).
    """
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_padded([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        sample = temperature > 0
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=None, eos_token_id=stop_token_ids(tokenizer), pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([JsonObjectClosed(tokenizer, width)]) if stop_after_json else None,
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress:
            print(f"  generated {min(start + batch_size, len(order))}/{len(order)}", file=sys.stderr, flush=True)
    return [outputs[i] for i in range(len(conversations))]


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7):
    """A terminal chat: type a message, get a reply; /reset clears the history, /exit or Ctrl-D quits."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("tunekit chat — /reset to clear, /exit to quit", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [history], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}", flush=True)


def dump_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
