"""The Ollama Modelfile of an exported GGUF: FROM, a Go TEMPLATE equivalent to the model's Jinja chat template,
PARAMETER stop lines for the end-of-turn tokens, and SYSTEM when the template has a default system prompt.

    Jinja chat template --render probe conversations--> per-role wrappers --> Go text/template --> Modelfile

Most chat templates are a concatenation of one wrapper per message (`prefix(role) + content + suffix(role)`)
plus a generation prompt (ChatML, Llama 3, Phi-3, Zephyr, Gemma ...). tunekit recovers the wrappers by rendering
probe conversations with sentinel contents, writes the Go template from them, and then checks the result by
rendering a set of conversations with Go's real text/template (gorender/main.go, Ollama's engine) against
`tokenizer.apply_chat_template`, byte for byte. A template that is not of this shape (one that merges the
system prompt into the first user turn, say) is refused with the first conversation that differs.

Ollama prepends the Modelfile's SYSTEM as a system message when a chat has none; the check renders what
Ollama would and compares it with what the Jinja template does for the same chat without a system message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

S, U, A, U2 = "\x01SYS\x01", "\x01USER\x01", "\x01ASSIST\x01", "\x01USER2\x01"


class TemplateError(ValueError):
    """The chat template has no Go equivalent tunekit can write, or the Go render differs."""


@dataclass
class Wrappers:
    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    start: str  # text before the first message (a BOS token the template prints)
    generation: str  # the assistant turn's opening, after the last message
    default_system: str | None  # the system prompt the template adds when a chat has none


def _split(text: str, sentinels: list[str]) -> list[str]:
    pieces = []
    for s in sentinels:
        head, sep, text = text.partition(s)
        if not sep:
            raise TemplateError(f"the chat template dropped a message's content ({s!r} not in its output)")
        pieces.append(head)
    return pieces + [text]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError(f"chat template is not one wrapper per message: {what}")
    return text[len(prefix):]


BOS = "\x01BOS\x01"


def wrappers(render, bos_text: str | None) -> Wrappers:
    """render(messages, add_generation_prompt, **template_kwargs) -> str (the Jinja template) -> the per-role
    wrappers. bos_text: the tokenizer's BOS token text, which the template may print first."""
    def m(role, content):
        return {"role": role, "content": content}

    full = render([m("system", S), m("user", U), m("assistant", A), m("user", U2)], False)
    p0, p1, p2, p3, p4 = _split(full, [S, U, A, U2])
    no_system = render([m("user", U), m("assistant", A)], False)
    q0, _q1, q2 = _split(no_system, [U, A])
    user_suffix, assistant_suffix = p4, q2
    user_prefix = _strip_prefix(p3, assistant_suffix, "the text between an assistant and a user turn")
    assistant_prefix = _strip_prefix(p2, user_suffix, "the text between a user and an assistant turn")
    if not p1.endswith(user_prefix):
        raise TemplateError("chat template is not one wrapper per message: system turn")
    system_suffix = p1[: len(p1) - len(user_prefix)]
    # The template prints the BOS token itself only if its output starts with the bos_token variable.
    start = bos_text if bos_text and render([m("system", S)], False, bos_token=BOS).startswith(BOS) else ""
    system_prefix = p0[len(start):]
    with_gen = render([m("system", S), m("user", U)], True)
    without_gen = render([m("system", S), m("user", U)], False)
    generation = _strip_prefix(with_gen, without_gen, "the generation prompt is not appended at the end")
    # What the template adds before the first user turn when there is no system message.
    if not q0.endswith(user_prefix):
        raise TemplateError("chat template is not one wrapper per message: first user turn")
    added = _strip_prefix(q0[: len(q0) - len(user_prefix)], start, "the start of a chat without a system message")
    default_system = None
    if added:
        if not (added.startswith(system_prefix) and added.endswith(system_suffix)):
            raise TemplateError("the template adds text before a chat without a system message that is not a "
                                "system turn")
        default_system = added[len(system_prefix): len(added) - len(system_suffix)]
    return Wrappers({"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
                    {"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                    start, generation, default_system)


def _literal(text: str) -> str:
    """Template text that prints `text`: verbatim, unless it holds the action delimiters."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text) + " }}"


def go_template(w: Wrappers) -> str:
    """The Ollama TEMPLATE: Go text/template over .Messages (each with .Role and .Content)."""
    branches = []
    for i, role in enumerate(("system", "user", "assistant")):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(w.prefix[role])}{{{{ .Content }}}}'
                        f"{_literal(w.suffix[role])}")
    return (f"{_literal(w.start)}{{{{- range .Messages }}}}{''.join(branches)}{{{{ end }}}}{{{{ end }}}}"
            f"{_literal(w.generation)}")


def modelfile(gguf_name: str, template: str, stops: list[str], system: str | None, params: dict | None = None) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    for key, value in (params or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# Conversations the check renders both ways (roles, unicode, newlines, braces, empty content, a long chat).
CHECK_CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You extract invoices as JSON."}, {"role": "user", "content": "INV-1, EUR 3"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x3?"}],
    [{"role": "system", "content": "Réponds en français. {\"a\": 1}"}, {"role": "user", "content": "Größe: 5 €\n\nok?"},
     {"role": "assistant", "content": "{{ not a template }}"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": "\n"}] * 3
    + [{"role": "user", "content": "end"}],
]


def go_binary(cache: Path) -> Path:
    """Build gorender once (Go's compiler, Debian's golang-go) into cache; the path of the binary."""
    go = shutil.which("go") or next((p for p in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go") if os.path.exists(p)),
                                    None)
    if go is None:
        raise FileNotFoundError("Go is not installed (apt-get install golang-go): the Ollama TEMPLATE check renders "
                                "it with Go's text/template")
    source = Path(__file__).parent / "gorender" / "main.go"
    binary = cache / "gorender"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOCACHE": str(cache / "gocache"), "GOPATH": str(cache / "gopath"), "GO111MODULE": "off"}
        subprocess.run([go, "build", "-o", str(binary), str(source)], check=True, env=env, capture_output=True)
    return binary


def go_render(template: str, cases: list[dict], binary: Path) -> list[str]:
    proc = subprocess.run([str(binary)], input=json.dumps({"Template": template, "Cases": cases}), text=True,
                          capture_output=True)
    out = json.loads(proc.stdout or "{}")
    if proc.returncode or isinstance(out, dict):
        raise TemplateError(f"Go text/template: {out.get('error') if isinstance(out, dict) else proc.stderr}")
    return out


def check_template(template: str, system: str | None, render, binary: Path) -> dict:
    """Render CHECK_CHATS with Go (as Ollama would: SYSTEM prepended to chats without one) and with the Jinja
    template; raise TemplateError at the first difference. Returns {"chats": n, "identical": n}."""
    cases = []
    for chat in CHECK_CHATS:
        messages = chat if chat[0]["role"] == "system" or not system else [{"role": "system", "content": system}] + chat
        cases.append({"System": system or "", "Messages": [{"Role": x["role"], "Content": x["content"]}
                                                           for x in messages]})
    got = go_render(template, cases, binary)
    for i, (chat, rendered) in enumerate(zip(CHECK_CHATS, got)):
        expected = render(chat, True)
        if rendered != expected:
            at = next((k for k, (a, b) in enumerate(zip(rendered, expected)) if a != b), min(len(rendered),
                                                                                               len(expected)))
            raise TemplateError(f"Go TEMPLATE and the Jinja chat template differ on check chat {i} at character "
                                f"{at}: Go {rendered[at:at + 40]!r} vs Jinja {expected[at:at + 40]!r}")
    return {"chats": len(CHECK_CHATS), "identical": len(CHECK_CHATS)}
