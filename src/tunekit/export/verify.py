"""Checks that an export computes what its source computes, each through the tool that will consume it.

    transformers: the exported folder / the GGUF dequantized by transformers (gguf_file=) -> logits vs source
    llama.cpp:    greedy continuations in llama.cpp, teacher-forced through the fp32 source in PyTorch -> top-1
                  agreement per position, the log-probability gap, identical continuations; the chat template
                  llama.cpp applies from the GGUF -> the same token ids as ours
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Conversations the checks run through both sides: invoice-like and general, short and long.
PROBE_CHATS = [
    [{"role": "user", "content": "Extract the invoice as JSON: Invoice INV-2024-0042 from Northwind Foods GmbH, "
                                 "dated 2024-03-05, total EUR 1,234.50, due 2024-04-04."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three rivers in Europe."}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "user", "content": "What is 17 times 23?"}, {"role": "assistant", "content": "391"},
     {"role": "user", "content": "And divided by 7?"}],
    [{"role": "user", "content": "Traduisez en allemand : « La facture est payée. »"}],
    [{"role": "user", "content": "List the steps to reset a password, numbered."}],
    [{"role": "user", "content": "Rechnung Nr. 88 von Müller & Söhne, Betrag 99,90 EUR. Als JSON bitte."}],
    [{"role": "user", "content": "Explain what a GGUF file is in two sentences."}],
]


@dataclass
class LogitCheck:
    prompts: int
    positions: int
    max_abs_diff: float  # largest |logit difference| over all positions and vocabulary
    top1_agreement: float  # share of positions whose argmax is the same

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LlamaCppCheck:
    prompts: int
    positions: int  # generated tokens compared
    top1_agreement: float  # share of llama.cpp's greedy tokens that are also PyTorch's argmax there
    identical_continuations: int  # prompts whose whole greedy continuation is the same in both
    max_logprob_gap: float  # largest |log p_llama.cpp - log p_pytorch| of a chosen token
    chat_template_identical: int  # probe chats whose llama.cpp prompt tokens equal ours
    tokens_per_s: float  # llama.cpp's decode speed in the check (single stream; not a benchmark)

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, chat: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@torch.no_grad()
def compare_logits(reference, other, tokenizer, chats=PROBE_CHATS) -> LogitCheck:
    """Logits of two transformers models on the probe chats (reference in fp32; other cast to fp32 outputs)."""
    diff, agree, positions = 0.0, 0, 0
    for chat in chats:
        ids = torch.tensor([prompt_ids(tokenizer, chat)])
        a = reference(input_ids=ids).logits.float()
        b = other(input_ids=ids).logits.float()
        diff = max(diff, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += ids.shape[1]
    return LogitCheck(len(chats), positions, diff, agree / positions)


@torch.no_grad()
def compare_llamacpp(gguf_path: str, reference, tokenizer, chats=PROBE_CHATS, n_new: int = 24,
                     lora: str | None = None, threads: int | None = None) -> LlamaCppCheck:
    """llama.cpp's greedy continuations of the probe chats against the fp32 PyTorch reference."""
    from .llamacpp import LlamaCpp

    agree = positions = identical = template_ok = 0
    gap, speeds = 0.0, []
    with LlamaCpp(gguf_path, lora=lora, threads=threads) as llm:
        for chat in chats:
            ids = prompt_ids(tokenizer, chat)
            if llm.tokenize(llm.apply_template(chat)) == ids:
                template_ok += 1
            out = llm.greedy(ids, n_new)
            speeds.append(out.tokens_per_s)
            if not out.tokens:
                continue
            seq = torch.tensor([ids + out.tokens])
            logp = torch.log_softmax(reference(input_ids=seq).logits[0, len(ids) - 1: -1].float(), -1)
            chosen = torch.tensor(out.tokens)
            match = logp.argmax(-1) == chosen
            agree += int(match.sum())
            positions += len(out.tokens)
            identical += int(bool(match.all()))
            ref_lp = logp.gather(1, chosen[:, None])[:, 0]
            known = [k for k, lp in enumerate(out.logprobs) if lp is not None]
            if known:
                theirs = torch.tensor([out.logprobs[k] for k in known])
                gap = max(gap, float((ref_lp[known] - theirs).abs().max()))
    return LlamaCppCheck(len(chats), positions, agree / max(positions, 1), identical, gap, template_ok,
                         sum(speeds) / max(len(speeds), 1))
