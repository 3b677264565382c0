"""Constrained decoding for `response_format` (json_object, json_schema) through llguidance.

llguidance (guidance-ai's Rust library) compiles a JSON schema into a grammar and computes, per step, the set of
tokens that keep the output a valid prefix of it (a bitmask over the vocabulary, ~50 us per token on a 128k vocab by
its authors' figure). We mask the logits with it before sampling and feed the chosen token back, so the output
always parses and matches the schema. The end-of-turn tokens are its EOS: allowed only once the JSON is complete.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import torch


# The layout constrained JSON is written in: Python's json.dumps default (", " and ": "), what fine-tuning data made
# with json.dumps teaches. llguidance's own default is compact (",", ":"): forcing that on the demo's adapter, trained
# on json.dumps output, dropped its exact match from 87% to 20% (tunekit bench serve-quality, first run). A schema's
# "x-guidance" object overrides it (llguidance's JsonCompileOptions: item_separator, key_separator,
# whitespace_flexible, ...).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(ValueError):
    """The response_format cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids

    @cached_property
    def ll_tokenizer(self):  # ~1 s to build: only when the first constrained request arrives
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_ids)

    def grammar(self, response_format: dict) -> str | None:
        """The llguidance grammar for an OpenAI response_format (None for type text)."""
        from llguidance import LLMatcher

        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise SchemaError("response_format.json_schema must be an object with a 'schema' object",
                                  "response_format.json_schema")
            schema = spec.get("schema") or {"type": "object"}
        else:
            raise SchemaError(f"response_format.type {kind!r}: choose text, json_object or json_schema",
                              "response_format.type")
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        except ValueError as e:
            raise SchemaError(f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema") from None
        error = LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error and not error.startswith("WARNING"):
            raise SchemaError(f"response_format.json_schema.schema is not supported: {error}",
                              "response_format.json_schema.schema")
        return grammar

    def matcher(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.ll_tokenizer, grammar, log_level=0)


def allowed_mask(matcher, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the tokens the grammar allows next."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(bits, bitorder="little")[:vocab_size].astype(bool)
    return torch.from_numpy(allowed)
