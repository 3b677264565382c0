"""API keys, per-key permissions and rate limits.

Keys come from a file (`--api-keys FILE`, YAML or JSON) and/or the environment (TUNEKIT_API_KEYS and
TUNEKIT_ADMIN_KEYS, comma-separated). Only SHA-256 digests are kept in memory; a presented key is hashed and
compared with every stored digest in constant time (hmac.compare_digest), so timing reveals nothing about which
key nearly matched. The file may hold digests instead of keys (`sha256: <hex>`), so plaintext keys need not sit
on the server's disk at all. A file entry:

    keys:
      - key: sk-team-a-...          # or  sha256: 9f86d08...
        name: team-a
        admin: false                # admin keys may load/unload adapters; user keys may not
        adapters: [invoices, base]  # optional: the models this key may use (default: all)
        rate_limit: 120             # optional: requests per minute (default: no limit)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class KeyFileError(ValueError):
    pass


@dataclass
class ApiKey:
    name: str
    digest: bytes
    admin: bool = False
    adapters: set[str] | None = None  # None: every model
    rate_limit: float | None = None  # requests per minute
    _tokens: float = 0.0
    _stamp: float = field(default_factory=time.monotonic)

    def allows(self, model: str) -> bool:
        return self.adapters is None or model in self.adapters


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    def __init__(self, keys: list[ApiKey]):
        self.keys = keys
        self._lock = threading.Lock()

    @classmethod
    def from_sources(cls, path: str | None = None, env: dict | None = None) -> "KeyStore":
        env = os.environ if env is None else env
        keys = load_key_file(Path(path)) if path else []
        for var, admin in (("TUNEKIT_API_KEYS", False), ("TUNEKIT_ADMIN_KEYS", True)):
            for i, k in enumerate(x.strip() for x in env.get(var, "").split(",")):
                if k:
                    keys.append(ApiKey(f"{var.lower()}[{i}]", digest(k), admin=admin))
        return cls(keys)

    def generate(self) -> tuple[str, str]:
        """Make one user key and one admin key (when none were configured); returns them for printing once."""
        user, admin = "sk-tunekit-" + secrets.token_urlsafe(24), "sk-tunekit-admin-" + secrets.token_urlsafe(24)
        self.keys += [ApiKey("generated-user", digest(user)), ApiKey("generated-admin", digest(admin), admin=True)]
        return user, admin

    def lookup(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        d = digest(presented)
        found = None
        for key in self.keys:  # no early exit: the same work whichever key matches
            if hmac.compare_digest(key.digest, d):
                found = key
        return found

    def take(self, key: ApiKey) -> float | None:
        """Spend one request from the key's bucket; None if allowed, else seconds until the next is."""
        if key.rate_limit is None:
            return None
        with self._lock:
            now = time.monotonic()
            per_second = key.rate_limit / 60.0
            key._tokens = min(key.rate_limit, key._tokens + (now - key._stamp) * per_second)
            key._stamp = now
            if key._tokens >= 1.0:
                key._tokens -= 1.0
                return None
            return (1.0 - key._tokens) / per_second


def load_key_file(path: Path) -> list[ApiKey]:
    import yaml

    if not path.exists():
        raise KeyFileError(f"{path}: API key file not found")
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise KeyFileError(f"{path}: cannot parse ({e})") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f"{path}: expected a top-level 'keys:' list")
    keys = []
    for i, e in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(e, dict):
            raise KeyFileError(f"{where}: expected a mapping with 'key' or 'sha256'")
        unknown = set(e) - {"key", "sha256", "name", "admin", "adapters", "rate_limit"}
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid: key, sha256, name, "
                               f"admin, adapters, rate_limit")
        if ("key" in e) == ("sha256" in e):
            raise KeyFileError(f"{where}: give exactly one of 'key' or 'sha256'")
        if "key" in e:
            d = digest(str(e["key"]))
        else:
            try:
                d = bytes.fromhex(str(e["sha256"]))
            except ValueError:
                d = b""
            if len(d) != 32:
                raise KeyFileError(f"{where}.sha256: expected 64 hex digits")
        adapters = e.get("adapters")
        if adapters is not None and not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
            raise KeyFileError(f"{where}.adapters: expected a list of model names")
        rate = e.get("rate_limit")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise KeyFileError(f"{where}.rate_limit: expected a positive number of requests per minute")
        keys.append(ApiKey(str(e.get("name", f"key{i}")), d, bool(e.get("admin", False)),
                           set(adapters) if adapters is not None else None, float(rate) if rate else None,
                           _tokens=float(rate) if rate else 0.0))
    return keys
