"""Random requests, seeded and bounded in count and time, at the server's endpoints: every answer must be a 2xx or
a 4xx with OpenAI's error object (never a 500, a hang or a dropped connection), and the server must answer
normally afterwards. Run it longer against a server of your own with `python tests/test_fuzz.py URL --count N`."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter

import httpx

ERROR_KEYS = {"message", "type", "param", "code"}
PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
FIELDS = ("prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stream_options", "stop", "logprobs", "top_logprobs", "echo", "seed", "model", "min_tokens",
          "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "user", "suffix", "best_of",
          "response_format", "tools", "return_token_ids", "tokens")
TEXT = ["", "hi", "Once upon a time", "\u00e9\u00e8 \U0001F30D \u4e2d\u6587", "\ud800", "a\udfffb", "\x00",
        "<|endoftext|>", "###", "x" * 3000]


def value(rng: random.Random, depth: int = 0):
    """Any JSON value, leaning to the sizes and types the fields take."""
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, 2, 3, 5, 16, -1, 2**31, 2**63, 10**30, rng.randrange(-10, 200)])
    if kind == 3:
        return rng.choice([0.0, 0.5, 1.0, 2.5, -1.0, 1e308, 1e-300, rng.uniform(-5, 5)])
    if kind in (4, 5):
        return rng.choice(TEXT)
    if kind in (6, 7):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return [{"role": rng.choice(["user", "system", "assistant", "tool", "wizard"]),
                 "content": value(rng, depth + 1)} for _ in range(rng.randrange(3))]
    return {rng.choice(FIELDS + ("x", "type", "include_usage")): value(rng, depth + 1) for _ in range(rng.randrange(3))}


def request(rng: random.Random) -> tuple[str, bytes]:
    """(path, body): mostly objects of real fields with random values; some raw bytes, broken or odd JSON."""
    path = rng.choice(PATHS)
    roll = rng.random()
    if roll < 0.06:
        return path, bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if roll < 0.12:
        return path, rng.choice([b"", b"{", b"[]", b"null", b"1", b'"x"', b'{"prompt": NaN}', b'{"prompt": "hi",}',
                                 b'{"max_tokens": Infinity, "prompt": "x"}', b'{"prompt": "a", "prompt": 3}'])
    body = {"prompt": rng.choice(TEXT[:4])} if "chat" not in path else {"messages": [{"role": "user",
                                                                                      "content": "hi"}]}
    body["max_tokens"] = rng.randrange(1, 6)
    if rng.random() < 0.3:  # a random value is seldom a boolean true: streams need a push to be tried at all
        body["stream"] = True
    for _ in range(rng.randrange(1, 5)):
        body[rng.choice(FIELDS)] = value(rng)
    return path, json.dumps(body).encode()


def check(answer: httpx.Response, stream_lines: list[str] | None) -> str | None:
    """What is wrong with an answer, or None."""
    if answer.status_code >= 500 or answer.status_code < 200:
        return f"status {answer.status_code}: {answer.text[:200]}"
    if answer.status_code >= 300:
        error = answer.json().get("error") if answer.headers.get("content-type", "").startswith(
            "application/json") else None
        if not isinstance(error, dict) or set(error) != ERROR_KEYS:
            return f"status {answer.status_code} without an error object: {answer.text[:200]}"
    if stream_lines is not None and (not stream_lines or stream_lines[-1] != "data: [DONE]"):
        return f"a stream that did not end with [DONE]: {stream_lines[-2:]}"
    return None


def fuzz(http: httpx.Client, count: int, seconds: float, seed: int = 0) -> tuple[int, list[str], Counter]:
    """(requests sent, problems found, answers by status and kind): up to `count` requests, for at most
    `seconds`."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    sent, problems, answers = 0, [], Counter()
    while sent < count and time.monotonic() < deadline:
        path, body = request(rng)
        headers = {"content-type": "application/json"}
        sent += 1
        try:
            with http.stream("POST", path, content=body, headers=headers) as answer:
                streamed = answer.headers.get("content-type", "").startswith("text/event-stream")
                lines = [line for line in answer.iter_lines() if line.startswith("data: ")] if streamed else None
                if not streamed:
                    answer.read()
                problem = check(answer, lines)
                answers[f"{answer.status_code}{' stream' if streamed else ''}"] += 1
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            problems.append(f"{path} {body[:300]!r}: {problem}")
    return sent, problems, answers


def test_random_requests_get_answers_or_error_objects_never_a_500(artifact):
    from test_serve import Served

    from gptj_tvm.runtime.server import create_app, server_for

    app = create_app(artifact("tiny"), max_batch=4, model_name="tiny", max_n=4)
    server = Served(app, server=server_for(app))
    try:
        sent, problems, answers = fuzz(server.http, count=400, seconds=90, seed=0)
        assert sent >= 100 and not problems, problems[:5]
        assert answers["200"] and answers["200 stream"] and answers["400"], answers  # it reached the engine too
        assert server.http.get("/health").status_code == 200
        answer = server.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        assert server.state.engine.stats()["running"] == 0
    finally:
        server.close()


if __name__ == "__main__":  # a longer run against a server of your own
    parser = argparse.ArgumentParser(description="Throw seeded random requests at a gptj-tvm server.")
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, trust_env=False, timeout=120, headers=auth) as client:
        total, found, statuses = fuzz(client, args.count, args.seconds, args.seed)
    print(json.dumps({"sent": total, "answers": dict(statuses.most_common()), "problems": len(found),
                      "first": found[:10]}, indent=2))
    sys.exit(1 if found else 0)
