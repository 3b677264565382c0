"""Erasure beyond the log store: the owner references RAG ingest records, and the eraser that finds them.

`tunekit rag ingest --owner USER` (and `ingest(..., owner=owner_ref(user))`) records with every file a reference to
the user it came from, never the id itself: `hmac:` + HMAC-SHA256(TUNEKIT_PII_SECRET, id) when the deployment has a
secret, else `sha256:` + SHA-256(id) (a weaker pseudonym: anyone who guesses the id can confirm it; set the
secret). An erasure looks for both forms, so files ingested before a secret was set are found too.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import SECRET_ENV


def owner_refs(user: str) -> list[str]:
    """Every reference an ingest may have recorded for `user`; the first is the one recorded now."""
    plain = "sha256:" + hashlib.sha256(user.encode("utf-8")).hexdigest()
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        return [plain]
    return ["hmac:" + hmac.new(secret.encode(), user.encode("utf-8"), hashlib.sha256).hexdigest(), plain]


def owner_ref(user: str) -> str:
    return owner_refs(user)[0]


def rag_eraser(rag):
    """fn(user) -> {collection: {files, chunks}} over a RAG store URL/folder, a Store, or a RagService: every file
    ingested with the user's owner reference, in every collection."""
    from ..rag.service import RagService, erase_owner
    from ..rag.stores import Store, open_store

    def erase(user: str) -> dict:
        out: dict[str, dict[str, int]] = {}
        for ref in owner_refs(user):
            if isinstance(rag, RagService):
                found = rag.erase_owner(ref)
            else:
                store = rag if isinstance(rag, Store) else open_store(rag)
                try:
                    found = erase_owner(store, ref)
                finally:
                    if store is not rag:
                        store.close()
            for name, c in found.items():
                o = out.setdefault(name, {"files": 0, "chunks": 0})
                o["files"] += c["files"]
                o["chunks"] += c["chunks"]
        return out

    return erase
