"""Read a team's documents into text that keeps its structure: txt, md, html, pdf, docx.

Every loader returns a `Document`: a source and a list of `Section`s, each with its heading path (the headings
above it, outermost first), its text and, for PDFs, its page. Chunking (chunking.py) never crosses a section, so
a chunk's heading path says where in the document it comes from. A file that cannot be read (empty, binary,
undecodable, encrypted or text-less PDF, a broken docx) raises `LoadError` naming the file and why: ingest skips
it with a warning and goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
            ".pdf": "pdf", ".docx": "docx"}


class LoadError(ValueError):
    """A file ingest cannot read; the message names the file and the reason."""


@dataclass
class Section:
    heading: list[str]  # heading path, outermost first ([] before the first heading)
    text: str
    page: int | None = None  # 1-based page number, PDFs only


@dataclass
class Document:
    source: str
    sections: list[Section] = field(default_factory=list)
    title: str | None = None

    def full_text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


def find_files(inputs: list[str | Path]) -> list[Path]:
    """Every supported file under the given folders (recursively, sorted) and the given files themselves."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def load_file(path: str | Path, source: str | None = None) -> Document:
    """Read one file by its suffix; raises LoadError (naming the file) when it cannot be read."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LoadError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(sorted(SUFFIXES))})")
    data = path.read_bytes()
    if not data.strip():
        raise LoadError(f"{path}: empty file")
    doc = {"txt": _text, "md": _markdown, "html": _html, "pdf": _pdf, "docx": _docx}[kind](path, data)
    doc.source = source or str(path)
    doc.sections = [s for s in doc.sections if s.text.strip()]
    if not doc.sections:
        raise LoadError(f"{path}: no text in it")
    return doc


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise LoadError(f"{path}: binary content (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it with "
                        f"iconv -t utf-8") from None


def _text(path: Path, data: bytes) -> Document:
    return Document(str(path), [Section([], _decode(path, data).replace("\r\n", "\n"))])


_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _markdown(path: Path, data: bytes) -> Document:
    """ATX headings (#, ##, ...) open sections; fenced code is kept as text, never read as a heading."""
    sections, stack, lines, fenced = [], [], [], False

    def close():
        if lines:
            sections.append(Section(list(stack), "\n".join(lines).strip("\n")))
            lines.clear()

    for line in _decode(path, data).replace("\r\n", "\n").split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        m = None if fenced else _ATX.match(line)
        if m:
            close()
            level = len(m.group(1))
            stack[:] = stack[:level - 1] + [m.group(2)]
            continue
        lines.append(line)
    close()
    title = sections[0].heading[0] if sections and sections[0].heading else None
    return Document(str(path), sections, title)


class _HtmlSections(HTMLParser):
    """h1-h6 open sections; block elements end paragraphs; script/style/nav are dropped."""

    BLOCK = {"p", "div", "li", "ul", "ol", "table", "tr", "pre", "br", "dt", "dd", "blockquote", "section"}
    SKIP = {"script", "style", "noscript", "nav", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.stack: list[str] = []
        self.parts: list[str] = []
        self.heading_level: int | None = None
        self.heading_text: list[str] = []
        self.skipping = 0
        self.title: str | None = None
        self._in_title = False

    def _close(self):
        text = re.sub(r"[ \t]+", " ", "".join(self.parts))
        text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
        if text:
            self.sections.append(Section(list(self.stack), text))
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._close()
            self.heading_level, self.heading_text = int(tag[1]), []
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "div", "table", "pre", "section") else "\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif self.heading_level is not None and tag == f"h{self.heading_level}":
            heading = re.sub(r"\s+", " ", "".join(self.heading_text)).strip()
            self.stack = self.stack[:self.heading_level - 1] + [heading]
            self.stack = [h for h in self.stack if h]
            self.heading_level = None
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title = (self.title or "") + data.strip()
        if self.skipping:
            return
        (self.heading_text if self.heading_level is not None else self.parts).append(data)


def _html(path: Path, data: bytes) -> Document:
    m = re.search(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_-]+)", data[:4096], re.I)
    if m and m.group(1).lower() not in (b"utf-8", b"utf8"):
        try:
            text = data.decode(m.group(1).decode("ascii"))
        except (LookupError, UnicodeDecodeError):
            raise LoadError(f"{path}: cannot decode as its declared charset {m.group(1).decode()!r}") from None
    else:
        text = _decode(path, data)
    parser = _HtmlSections()
    parser.feed(text)
    parser.close()
    parser._close()
    return Document(str(path), parser.sections, parser.title)


def _pdf(path: Path, data: bytes) -> Document:
    """One section per page (page numbers 1-based). Encrypted files are tried with the empty password."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoadError(f"{path}: encrypted PDF (needs a password); decrypt it first (qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise LoadError(f"{path}: unreadable PDF ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - pypdf raises many kinds on damaged files; any of them means "skip it"
        if type(e).__name__ == "DependencyError":
            raise LoadError(f"{path}: encrypted PDF that needs the cryptography package: {e}") from None
        raise LoadError(f"{path}: unreadable PDF ({type(e).__name__}: {e})") from None
    if not any(p.strip() for p in pages):
        raise LoadError(f"{path}: PDF without extractable text (scanned images? run OCR first)")
    title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    return Document(str(path), [Section([], p, page=i + 1) for i, p in enumerate(pages)], str(title) if title else None)


def _docx(path: Path, data: bytes) -> Document:
    """Paragraph styles 'Title' and 'Heading N' open sections; tables are read row by row."""
    import io
    import zipfile

    try:
        import docx
    except ImportError:  # pragma: no cover - python-docx is a dependency
        raise LoadError(f"{path}: reading .docx needs python-docx (pip install python-docx)") from None
    try:
        d = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise LoadError(f"{path}: not a readable .docx ({type(e).__name__}: {e})") from None
    sections, stack, lines, title = [], [], [], None

    def close():
        if lines:
            sections.append(Section(list(stack), "\n\n".join(lines)))
            lines.clear()

    for p in d.paragraphs:
        style = (p.style.name if p.style is not None else "") or ""
        m = re.fullmatch(r"Heading (\d)", style)
        if style == "Title" or m:
            close()
            level = int(m.group(1)) if m else 1
            title = title or (p.text.strip() if style == "Title" else None)
            stack[:] = [h for h in stack[:level - 1] + [p.text.strip()] if h]
        elif p.text.strip():
            lines.append(p.text.strip())
    for table in d.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells if c.text.strip()]
            if cells:
                lines.append(" | ".join(cells))
    close()
    return Document(str(path), sections, title)
