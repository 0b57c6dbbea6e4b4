"""`gptj-tvm serve`: the OpenAI-compatible server on the tiny artifact, driven by the real `openai` client and raw
httpx over loopback; every answer is checked against the same request run alone through `Generator.generate`.

Past 400 lines for a reason: the endpoints share one server per module (one load of the artifact), so their
tests live together."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gptj_tvm.cli import build_parser
from gptj_tvm.core.errors import GptjError
from gptj_tvm.runtime.artifact import ArtifactMetadata
from gptj_tvm.runtime.openai_api import ChatMessage, chat_prompt
from gptj_tvm.runtime.server import create_app
from gptj_tvm.runtime.serving import slot_positions

PROMPT = "Once upon a time"
FINISH = {"eos": "stop", "length": "length", "context": "length", "stop": "stop"}


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.02)


class Served:
    """An app under uvicorn on a thread, on a free loopback port."""

    def __init__(self, app, ready: bool = True, server: uvicorn.Server | None = None):
        self.app, self.state = app, app.state.served
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = server or uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=60)
        wait_until(lambda: self.uvicorn.started, 30, "the server to start")
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_until(lambda: self.http.get("/health").status_code == 200, 60, "/health to answer 200")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             http_client=httpx.Client(trust_env=False, timeout=60))

    def metric(self, name: str, **labels) -> float:
        for family in text_string_to_metric_families(self.http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def close(self) -> None:
        self.http.close()
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def serve(artifact):
    """serve(**create_app options) -> a Served on the tiny artifact, closed at the end of the module."""
    started = []

    def make(ready: bool = True, **options):
        started.append(Served(create_app(artifact("tiny"), **options), ready=ready))
        return started[-1]

    yield make
    for served in started:
        served.close()


@pytest.fixture(scope="module")
def server(serve):
    return serve(max_batch=8, max_queue=64, model_name="tiny")


@pytest.fixture
def client(server):
    return server.client()


@contextmanager
def held_steps(engine, delay: float | None = None):
    """The engine's real step, made to wait: at a gate the test opens (delay None), or delay seconds each."""
    gate = threading.Event()
    real = engine.model.run_step

    def held(*args):
        if delay is None:
            gate.wait(30)
        else:
            time.sleep(delay)
        return real(*args)

    engine.model.run_step = held
    try:
        yield gate
    finally:
        gate.set()
        del engine.model.run_step


def solo(gen, prompt, max_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()):
    ids = gen.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return gen.generate(ids, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        stop=stop)


def test_completion_equals_generate_alone(client, generator):
    gen = generator("tiny")
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    reference = solo(gen, PROMPT, 12)
    choice = out.choices[0]
    assert choice.token_ids == reference.ids
    assert choice.text == gen.tokenizer.decode(reference.ids) == reference.text
    assert choice.finish_reason == FINISH[reference.finish_reason]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(reference.prompt_ids), len(reference.ids))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.id.startswith("cmpl-")


def test_n_choices_and_several_prompts_each_sample_with_seed_plus_i(client, generator):
    gen = generator("tiny")
    prompts = [[464, 10730, 29598], [15496, 995]]
    options = dict(temperature=0.9, top_p=0.95, seed=11)
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, n=3, extra_body={"top_k": 40},
                                    **options)
    assert [c.index for c in out.choices] == list(range(6))
    for choice in out.choices:
        prompt, i = prompts[choice.index // 3], choice.index % 3
        reference = solo(gen, prompt, 8, temperature=0.9, top_k=40, top_p=0.95, seed=11 + i)
        assert choice.text == reference.text
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == 5


def test_stream_joins_to_the_plain_text_and_ends_with_usage(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stop_string_cuts_the_text_and_says_stop(client, generator):
    gen = generator("tiny")
    full = solo(gen, PROMPT, 24).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    reference = solo(gen, PROMPT, 24, stop=[stop])
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                    stop=[stop, "\x00never"])
    assert out.choices[0].text == reference.text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reference.text


def test_logprobs_with_echo_match_the_model(client, generator):
    gen = generator("tiny")
    prompt_ids = gen.tokenizer.encode(PROMPT)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True,
                                    extra_body={"return_token_ids": True})
    choice = out.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(PROMPT)
    n_prompt = len(prompt_ids)
    assert len(logprobs.tokens) == n_prompt + 6
    assert logprobs.token_logprobs[:n_prompt] == [None] * n_prompt  # the prompt is not scored (echo)
    assert "".join(logprobs.tokens) == choice.text
    for offset, token in zip(logprobs.text_offset, logprobs.tokens):
        assert choice.text[offset:offset + len(token)] == token
    ids = prompt_ids + choice.token_ids
    logits = gen.logits(ids).astype(np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    for k, token in enumerate(choice.token_ids):
        row = logp[n_prompt - 1 + k]
        assert math.isclose(logprobs.token_logprobs[n_prompt + k], row[token], abs_tol=1e-4)
        top = logprobs.top_logprobs[n_prompt + k]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(row.max(), abs=1e-4)


def test_chat_uses_the_plain_template_and_streams_role_first(client, generator):
    gen = generator("tiny")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reference = solo(gen, "system: Be brief.\nuser: Hello there\nassistant:", 10)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference.text
    assert out.object == "chat.completion" and out.usage.completion_tokens == len(reference.ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    assert chunks[-2].choices[0].finish_reason == FINISH[reference.finish_reason]
    assert chunks[-1].usage.prompt_tokens == len(reference.prompt_ids)


def test_chat_templates_are_the_documented_ones():
    messages = [ChatMessage(role="user", content="Say hi"), ChatMessage(role="assistant", content="hi"),
                ChatMessage(role="user", content=[{"type": "text", "text": "Again"}])]
    assert chat_prompt(messages, "plain") == "user: Say hi\nassistant: hi\nuser: Again\nassistant:"
    assert chat_prompt(messages[:1], "dolly") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi\n\n### Response:\n")
    assert chat_prompt(messages, "dolly").endswith(
        "### Instruction:\nSay hi\n\n### Response:\nhi\n\n### End\n\n### Instruction:\nAgain\n\n### Response:\n")


def test_bad_fields_are_400_naming_the_field(client, server):
    cases = [(dict(prompt=PROMPT, temperature=5), "temperature"), (dict(prompt=PROMPT, max_tokens=0), "max_tokens"),
             (dict(prompt=PROMPT, n=17), "n"), (dict(prompt=PROMPT, max_tokens=100000), "max_tokens"),
             (dict(prompt=PROMPT, logprobs=6), "logprobs"), (dict(prompt=PROMPT, logit_bias={"1": 5}), "logit_bias"),
             (dict(prompt=PROMPT, best_of=3), "best_of"), (dict(prompt=PROMPT, suffix="end"), "suffix"),
             (dict(prompt=PROMPT, seed=-1), "seed"),
             (dict(prompt=[]), "prompt"), (dict(prompt=[464, 50400]), "prompt"),
             (dict(prompt=list(range(200))), "prompt")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="tiny", **fields)
        assert raised.value.body["param"] == param and param in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny",
                                       messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    accepted = client.completions.create(model=server.state.model, prompt=PROMPT, max_tokens=2, user="me",
                                         extra_body={"some_new_field": 1, "best_of": 1})
    assert accepted.model == server.state.model and accepted.choices[0].text
    for body, status in [(b"{not json", 400), (b"[1]", 400), (b"x" * ((1 << 20) + 10), 413)]:
        answer = server.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == status and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert server.http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_raw_sse_with_httpx(server):
    lines = []
    with server.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True,
                                                              "temperature": 0}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        text = "".join(answer.iter_text())
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        lines.append(json.loads(event[len("data: "):]))
    assert lines[-1]["choices"][0]["finish_reason"] == "length"
    assert all(line["object"] == "text_completion" for line in lines)


def test_64_concurrent_requests_each_equal_its_solo_run(server, generator):
    gen = generator("tiny")
    rng = np.random.default_rng(5)
    requests = []
    for i in range(64):
        body = {"prompt": rng.integers(0, 50256, int(rng.integers(1, 60))).tolist(),
                "max_tokens": int(rng.integers(1, 17)), "return_token_ids": True, "stream": i % 4 == 3}
        body.update(temperature=0) if i % 2 else body.update(temperature=0.8, top_p=0.9, top_k=50, seed=i)
        requests.append(body)

    async def one(http: httpx.AsyncClient, body: dict) -> list[int]:
        if not body["stream"]:
            answer = await http.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["token_ids"]
        ids = []
        async with http.stream("POST", "/v1/completions", json=body) as answer:
            async for line in answer.aiter_lines():
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return ids

    async def all_of_them():
        async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=120) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, body) for body in requests)), 300)

    answers = asyncio.run(all_of_them())
    for body, ids in zip(requests, answers):
        reference = solo(gen, body["prompt"], body["max_tokens"], body["temperature"], body.get("top_k", 0),
                         body.get("top_p", 1.0), body.get("seed"))
        assert ids == reference.ids
    assert server.state.engine.stats()["running"] == 0


def test_a_client_that_disconnects_frees_its_slot(server):
    engine = server.state.engine
    aborted = server.metric("gptj_tvm_request_finished_total", finish_reason="abort")
    generated = server.metric("gptj_tvm_generation_tokens_total")
    with held_steps(engine, delay=0.05):  # 120 tokens would take 6 s a request
        with server.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 120,
                                                                  "stream": True}) as answer:
            lines = answer.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            assert engine.stats()["running"] == 1
        wait_until(lambda: engine.stats()["running"] == 0, 3, "the slot to be freed")
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices within its poll
            server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 120}, timeout=0.5)
        wait_until(lambda: engine.stats()["running"] == 0, 3, "the slot to be freed")
    assert server.metric("gptj_tvm_request_finished_total", finish_reason="abort") == aborted + 2
    assert server.metric("gptj_tvm_generation_tokens_total") - generated < 120


def test_full_queue_is_429_and_the_queued_requests_complete(serve, generator):
    small = serve(max_batch=1, max_queue=1, model_name="tiny")
    client, engine = small.client(), small.state.engine
    results = {}

    def complete(name: str, max_tokens: int):
        results[name] = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0)

    with held_steps(engine) as gate:
        workers = [threading.Thread(target=complete, args=("first", 10))]
        workers[0].start()
        wait_until(lambda: engine.stats()["running"] == 1, 10, "the first request to take the slot")
        workers.append(threading.Thread(target=complete, args=("second", 5)))
        workers[1].start()
        wait_until(lambda: engine.stats()["waiting"] == 1, 10, "the second request to queue")
        with pytest.raises(openai.RateLimitError) as raised:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)
        assert raised.value.response.headers["retry-after"] == "1"
        gate.set()
        for worker in workers:
            worker.join(timeout=60)
    gen = generator("tiny")
    assert results["first"].choices[0].text == solo(gen, PROMPT, 10).text
    assert results["second"].choices[0].text == solo(gen, PROMPT, 5).text
    assert small.metric("gptj_tvm_request_errors_total", status="429") == 1


def test_api_key_and_health_while_loading(serve, artifact):
    loaded = threading.Event()
    guarded = Served(create_app(artifact("tiny"), api_key="sekret", model_name="tiny-j"), ready=False)
    try:
        guarded.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            guarded.client("wrong").completions.create(model="tiny-j", prompt=PROMPT, max_tokens=2)
        unkeyed = guarded.http.get("/v1/models")
        assert unkeyed.status_code == 401 and unkeyed.json()["error"]["code"] == "invalid_api_key"
        out = guarded.client("sekret").completions.create(model="tiny-j", prompt=PROMPT, max_tokens=2)
        assert out.model == "tiny-j"
        assert [m.id for m in guarded.client("sekret").models.list()] == ["tiny-j"]
        assert guarded.http.get("/health").status_code == 200 and guarded.http.get("/metrics").status_code == 200
    finally:
        guarded.close()

    app = create_app(artifact("tiny"), model_name="tiny")
    real_load = app.state.served.load
    app.state.served.load = lambda: (loaded.wait(30), real_load())
    slow = Served(app, ready=False)
    try:
        health = slow.http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "loading"
        with pytest.raises(openai.InternalServerError):
            slow.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        loaded.set()
        slow.wait_ready()
    finally:
        loaded.set()
        slow.close()
    assert app.state.served.phase == "draining" and app.state.served.engine.stats()["running"] == 0


def test_health_metrics_tokenize(server, generator):
    gen = generator("tiny")
    assert server.http.get("/health").json() == {"status": "ok"}
    server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    families = {f.name: f for f in text_string_to_metric_families(server.http.get("/metrics").text)}
    for name in ("gptj_tvm_requests_running", "gptj_tvm_requests_waiting", "gptj_tvm_kv_cache_usage_ratio",
                 "gptj_tvm_prompt_tokens", "gptj_tvm_generation_tokens", "gptj_tvm_time_to_first_token_seconds",
                 "gptj_tvm_inter_token_latency_seconds", "gptj_tvm_request_finished", "gptj_tvm_request_errors"):
        assert name in families, name
    assert server.metric("gptj_tvm_generation_tokens_total") >= 3
    assert server.metric("gptj_tvm_time_to_first_token_seconds_count") >= 1
    tokens = server.http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == gen.tokenizer.encode(PROMPT) and tokens["count"] == len(tokens["tokens"])
    assert server.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    assert server.http.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400


def test_kv_cache_budget_sets_the_positions(artifact):
    meta = ArtifactMetadata.read(artifact("tiny"))  # 2 layers x 64 wide, float32: 1024 bytes a position
    assert slot_positions(meta, 8, None) == 128
    assert slot_positions(meta, 8, 8 * 64 * 1024 / 1e9) == 64
    assert slot_positions(meta, 8, 1.0) == 128
    with pytest.raises(GptjError, match="kv-cache-gb"):
        slot_positions(meta, 8, 8 * 15 * 1024 / 1e9)


def test_cli_serve_drains_on_sigterm(artifact):
    args = build_parser().parse_args(["serve", "x"])
    assert (args.host, args.port, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, 8, 64)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    process = subprocess.Popen([sys.executable, "-m", "gptj_tvm.cli", "serve", str(artifact("tiny")), "--port",
                                str(port), "--kv-cache-gb", "0.0006", "--drain-seconds", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as http:
            def healthy():
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 60, "the served CLI to be ready")
            assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 73  # 0.0006 GB / (8 x 1024 bytes)
            with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 60,
                                                              "stream": True}) as answer:
                lines = answer.iter_lines()
                assert next(line for line in lines if line.startswith("data: {"))
                process.send_signal(signal.SIGTERM)
                assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert process.returncode == 0 and "Shutting down" in output and "Traceback" not in output
