"""OpenAI's request bodies as pydantic models (what is accepted is what `/openapi.json` documents), and the
shaping of responses and stream chunks. Unknown fields are ignored, as OpenAI's own server does."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="tunekit extension: sample among the k most likely tokens (0: all)")
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class RagOptions(BaseModel):
    """tunekit extension (`extra_body={"rag": {...}}`): retrieve from a collection and answer with citations."""
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error naming it, not silently ignored
    collection: str = Field(min_length=1, max_length=63)
    top_k: int = Field(5, ge=1, le=50, strict=True)  # strict: true or "5" is a wrong type, not 1 or 5
    retriever: Literal["bm25", "dense", "hybrid"] = "hybrid"
    sources: list[str] | None = Field(None, description="only chunks of these sources")


class RagSearchRequest(RagOptions):
    query: str = Field(min_length=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    rag: RagOptions | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class AdapterLoad(_Body):
    name: str = Field(min_length=1, max_length=128)
    path: str
    pin: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    def one(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def completion_logprobs(tokenizer, entries: list[dict], offset: int = 0) -> dict:
    tokens = [tokenizer.decode([e["token"]]) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
