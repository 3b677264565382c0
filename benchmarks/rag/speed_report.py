"""Merge the JSON outputs of speed.py (one per queued job), draw the PNG and print the markdown table of docs/rag.md."""

from __future__ import annotations

import json
from pathlib import Path

STORES = ("faiss-flat", "faiss-hnsw", "pgvector-hnsw")
METHODS = ("bm25", "dense", "hybrid")


def merge(files: list[str], out: str, png: str | None) -> int:
    merged: dict = {"runs": [], "sizes": {}}
    for f in files:
        data = json.loads(Path(f).read_text())
        merged["runs"].append({"file": f, **data["meta"], "corpus": data["corpus"],
                               "query_embedding_ms": data["query_embedding_ms"]})
        merged.setdefault("ingest", data.get("ingest"))
        merged["sizes"].update(data["sizes"])
    Path(out).write_text(json.dumps(merged, indent=2))
    print(table(merged))
    if png:
        plot(merged, png)
    return 0


def _lat(row: dict) -> str:
    return f"{row['p50_ms']:.2f} / {row['p95_ms']:.2f}"


def table(d: dict) -> str:
    emb = ", ".join(f"{r['query_embedding_ms']} ms" for r in d["runs"])
    lines = [f"Query p50 / p95 in ms, top 10, query vector given (add the query embedding, {emb}, to dense and "
             "hybrid for end to end); recall@10 against FAISS flat.", "",
             "| chunks | store | fill chunks/s | size MB | BM25 build s | bm25 | dense | hybrid | dense recall@10 | "
             "hybrid recall@10 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, row in sorted(d["sizes"].items(), key=lambda kv: int(kv[0])):
        for store in STORES:
            s = row["stores"].get(store)
            if s is None:
                continue
            lines.append(f"| {int(size):,} | {store} | {s['fill_chunks_per_s']:,.0f} | {s['bytes'] / 1e6:.0f} | "
                         f"{s['bm25_build_s']} | " + " | ".join(_lat(s[m]) for m in METHODS) +
                         f" | {s['dense']['recall@10']:.3f} | {s['hybrid']['recall@10']:.3f} |")
        h = row.get("haystack", {})
        if "bm25" in h:
            lines.append(f"| {int(size):,} | Haystack {h['version']} in-memory (peer) | {h['fill_chunks_per_s']:,.0f} "
                         f"| - | (at write) | " + " | ".join(_lat(h[m]) for m in METHODS) +
                         f" | {h['dense']['recall@10 vs tunekit flat']:.3f} | "
                         f"{h['hybrid']['recall@10 vs tunekit flat']:.3f} |")
    lines += ["", "| chunks | FAISS HNSW efSearch | dense p50 / p95 ms | recall@10 |", "| --- | --- | --- | --- |"]
    for size, row in sorted(d["sizes"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(size):,} | flat (exact) | {_lat(row['stores']['faiss-flat']['dense'])} | 1.000 |")
        for ef, r in row.get("faiss-hnsw-ef", {}).items():
            lines.append(f"| {int(size):,} | {ef[2:]} | {_lat(r)} | {r['recall@10']:.3f} |")
        if "pgvector-hnsw" in row["stores"]:
            pg = row["stores"]["pgvector-hnsw"]["dense"]
            lines.append(f"| {int(size):,} | pgvector HNSW (ef_search 100) | {_lat(pg)} | {pg['recall@10']:.3f} |")
    for size, row in d["sizes"].items():
        b = row.get("bm25_libraries")
        if b and "bm25s" in b:
            lines.append(f"\nbm25s vs rank_bm25 at {int(size):,} chunks: {b['bm25s']['qps']:,} vs {b['rank_bm25']['qps']:,}"
                         f" queries/s ({b['bm25s_speedup']}x); index build {b['bm25s_index_s']} s vs "
                         f"{b['rank_bm25_index_s']} s.")
    if d.get("ingest"):
        i = d["ingest"]
        lines.append(f"\nIngest end to end ({i['files']} Wikipedia articles as .md files, FAISS flat): {i['chunks']} "
                     f"chunks in {i['s']} s, {i['chunks_per_s']} chunks/s; the same ingest again (unchanged, hashes "
                     f"only) {i['reingest_unchanged_s']} s.")
    return "\n".join(lines)


def plot(d: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = sorted(d["sizes"], key=int)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    systems = [*STORES, "haystack"]
    width = 0.8 / len(systems)
    x = np.arange(len(sizes) * len(METHODS))
    for j, system in enumerate(systems):
        vals = []
        for size in sizes:
            row = d["sizes"][size]
            src = row.get("haystack", {}) if system == "haystack" else row["stores"].get(system, {})
            vals += [src[m]["p50_ms"] if m in src else np.nan for m in METHODS]
        a.bar(x + (j - len(systems) / 2 + 0.5) * width, vals, width,
              label="Haystack in-memory (peer)" if system == "haystack" else system)
    a.set_xticks(x, [f"{m}\n{int(s) // 1000}k" for s in sizes for m in METHODS])
    a.set_yscale("log")
    a.set_ylabel("query p50, ms (log; query vector given)")
    a.set_title("query latency, top 10")
    a.legend(fontsize=8)
    for size in sizes:
        row = d["sizes"][size]
        pts = [(r["p50_ms"], r["recall@10"], ef[2:]) for ef, r in row.get("faiss-hnsw-ef", {}).items()]
        if pts:
            line, = b.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"FAISS HNSW {int(size) // 1000}k")
            for lat, rec, ef in pts:
                b.annotate(f"ef {ef}", (lat, rec), fontsize=7, xytext=(3, -9), textcoords="offset points")
        flat = row["stores"]["faiss-flat"]["dense"]
        b.plot([flat["p50_ms"]], [1.0], "s", label=f"FAISS flat {int(size) // 1000}k")
        if "pgvector-hnsw" in row["stores"]:
            pg = row["stores"]["pgvector-hnsw"]["dense"]
            b.plot([pg["p50_ms"]], [pg["recall@10"]], "^", label=f"pgvector HNSW {int(size) // 1000}k")
    b.set_xscale("log")
    b.set_xlabel("dense query p50, ms (log)")
    b.set_ylabel("recall@10 vs exact")
    b.set_title("approximate vs exact dense search")
    b.legend(fontsize=8)
    cpu = d["runs"][0]["cpu"] if d["runs"] else "?"
    fig.suptitle(f"tunekit rag speed ({cpu}, {d['runs'][0]['cores'] if d['runs'] else '?'} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
