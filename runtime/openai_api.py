"""OpenAI's API shapes for the server (runtime/server.py): the request models and their checks, prompts (the
chat template included), finish reasons, logprobs, and the JSON of responses and stream chunks.

Fields OpenAI servers accept but this one cannot honour are refused (400, naming the field) only where they
would change the result (`UNHONOURED`); any other unknown field is ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .text import IncrementalText

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # OpenAI takes 4 stop sequences; each is checked at every token
MAX_JSON_DEPTH = 64  # OpenAI's bodies nest a few levels; Python's parser gives up near 1,000
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's
DOLLY_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.")


def openai_finish_reason(reason: str | None) -> str | None:
    """A finished sequence's reason (the engine's, or "stop" at a stop string) as OpenAI names it."""
    return FINISH_REASONS.get(reason, reason) if reason else None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def check_json(data) -> None:
    """A parsed body nests at most MAX_JSON_DEPTH levels, and every string in it (keys too) is text the tokenizer
    can take: JSON's \\u escapes can spell a lone surrogate, which is no Unicode character."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the body nests past {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _is_text(key):
                raise ApiError(400, f"{path or 'the body'}: a key is not valid Unicode (a lone surrogate)",
                               path or None)
            if isinstance(item, str) and not _is_text(item):
                raise ApiError(400, f"{where}: not valid Unicode (a lone surrogate)", where)
            stack.append((item, where, depth + 1))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def from_validation_errors(errors) -> ApiError:
    """pydantic's (or FastAPI's) validation errors as one 400 naming the first bad field."""
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow", strict=True)  # "10" is not a number, "yes" not a boolean (OpenAI's 400)
    model: str | None = None  # absent: the one model served
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # absent: 1.0, as OpenAI; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): 0 or -1 keeps every token
    n: int = Field(1, ge=1)
    stop: Any = None  # a string or a list of strings
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0)  # numpy's generators take no negative seed
    return_token_ids: bool = False  # an extension (vLLM's): the prompt's and each choice's token ids
    min_tokens: int = Field(0, ge=0)  # vLLM's: no stop token or stop string before this many tokens
    ignore_eos: bool = False  # vLLM's: a stop token does not end the choice (benchmark clients fix lengths so)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop: must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", "stop")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of lists of token ids
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # a string, or a list of {"type": "text", "text": ...} parts; only an assistant's may be absent

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = self.content if isinstance(self.content, list) else [None]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise ApiError(400, f"messages.{index}.content: must be a string or a list of text parts "
                                "(this model reads text only)", f"messages.{index}.content")
        return "".join(p["text"] for p in parts)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


def _nonzero(value, _request) -> bool:
    return bool(value)


# field -> whether its value asks for something this server cannot do (the result would differ)
UNHONOURED = {
    "best_of": lambda value, request: value is not None and value != request.get("n", 1),
    "logit_bias": _nonzero, "suffix": _nonzero, "presence_penalty": _nonzero, "frequency_penalty": _nonzero,
    "min_p": _nonzero, "tools": _nonzero, "functions": _nonzero,
    "repetition_penalty": lambda value, _request: value not in (None, 1, 1.0),
    "tool_choice": lambda value, _request: value not in (None, "none", "auto"),
    "response_format": lambda value, _request: value not in (None, {"type": "text"}),
}


def refuse_unhonoured(raw: dict) -> None:
    for name, asks_for_more in UNHONOURED.items():
        if name in raw and asks_for_more(raw[name], raw):
            raise ApiError(400, f"{name}: not supported by this server (value {raw[name]!r})", name)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in value)


def completion_prompts(prompt) -> list[str] | list[list[int]]:
    """The prompt field as a list of texts (to tokenize) or of token id lists, one per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        return [list(p) for p in prompt]
    raise ApiError(400, "prompt: must be a string, a list of strings, a list of token ids or a list of lists of "
                        "token ids (none of them empty)", "prompt")


def chat_template(tokenizer) -> str:
    """"dolly" where the tokenizer has Dolly's end marker as one token, else "plain"."""
    return "dolly" if len(tokenizer.encode("### End")) == 1 else "plain"


def chat_prompt(messages: list[ChatMessage], template: str) -> str:
    """Messages as one prompt.

    dolly (Dolly's training format): a system message replaces the instruction preamble; each user message is an
    `### Instruction:` block, each assistant message a `### Response:` block closed by `### End`; the prompt
    ends with an open `### Response:`.
    plain: a `{role}: {content}` line per message, then `assistant:` for the model to continue.
    """
    texts = [(m.role, m.text(i)) for i, m in enumerate(messages)]
    if template == "plain":
        return "".join(f"{role}: {text}\n" for role, text in texts) + "assistant:"
    system = "\n\n".join(text for role, text in texts if role in ("system", "developer"))
    parts = [system or DOLLY_INTRO]
    for role, text in texts:
        if role == "user":
            parts.append(f"### Instruction:\n{text}")
        elif role == "assistant":
            parts.append(f"### Response:\n{text}\n\n### End")
    return "\n\n".join(parts) + "\n\n### Response:\n"


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, choice: IncrementalText, indexes: list[int], base: int,
                        prompt_ids: list[int] | None = None, prompt_text: str = "") -> dict:
    """The legacy completions logprobs object. With echo (prompt_ids), the prompt's tokens come first with null
    logprobs (the engine scores generated tokens only), their offsets from each token's own text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = 0
    for token in prompt_ids or []:
        piece = token_text(tokenizer, token)
        tokens.append(piece)
        token_logprobs.append(None)
        top_logprobs.append(None)
        text_offset.append(min(offset, len(prompt_text)))
        offset += len(piece)
    for i in indexes:
        event = choice.events[i]
        tokens.append(token_text(tokenizer, event.token))
        token_logprobs.append(event.logprob)
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in event.top_logprobs or []})
        text_offset.append(base + choice.offsets[i])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(tokenizer, choice: IncrementalText, indexes: list[int]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs or []]}
                        for e in (choice.events[i] for i in indexes)]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """cached_tokens: prompt tokens whose keys and values came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Shape:
    """The JSON of one endpoint's responses and stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        return {**body, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool = False) -> dict:
        """text None: no content (a chat chunk with an empty delta)."""
        if not self.chat:
            return self._envelope("text_completion", [self.choice(index, text or "", logprobs, finish_reason)])
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return self._envelope("chat.completion.chunk", [{"index": index, "delta": delta, "logprobs": logprobs,
                                                         "finish_reason": finish_reason}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        return {**body, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
