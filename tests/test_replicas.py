"""`gptj-tvm serve --replicas 2` on a Ray head on 127.0.0.1: one CLI process for the module (Ray's start-up is
seconds), two engine replicas of one CPU each on the tiny artifact. Answers are checked against the single-process
server in this process (tests/test_serve.py checks that one against Generator.generate and the numpy GPT-J);
which replica served a request is its `x-gptj-replica` header, and each replica's process id is in /health.
Every wait is bounded in count or time; the last test drains the cluster with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import PROMPT, Served

from gptj_tvm.cli import main as cli_main
from gptj_tvm.runtime.replica_routing import BLOCK_CHARS, affinity_keys
from gptj_tvm.runtime.server import create_app

MAX_BATCH = 8
READY_S = 240  # Ray's head, Serve, and two replicas importing TVM, on two busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, artifact, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.log = open(log_path, "w")  # a file, not a pipe: Ray's lines would fill a pipe nobody reads
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gptj_tvm.cli", "serve", str(artifact), "--replicas", "2", "--port", str(self.port),
             "--model-name", "tiny", "--max-batch", str(MAX_BATCH), "--drain-seconds", "20"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def replicas(self) -> dict:
        """replica id -> its /health entry, for every replica the ingress knows; {} while none is ready."""
        try:
            answer = self.http.get("/health", timeout=10)
        except httpx.TransportError:
            return {}
        return answer.json()["replicas"] if answer.status_code == 200 else {}

    def wait_ready(self, seconds: float, without: str | None = None) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the CLI stopped:\n{self.output()[-3000:]}"
            replicas = self.replicas()
            if len(replicas) == 2 and without not in replicas and all(r["phase"] == "ready"
                                                                     for r in replicas.values()):
                return replicas
            time.sleep(0.5)
        raise AssertionError(f"two ready replicas{' without ' + without if without else ''} not seen in {seconds} s:"
                             f" {self.replicas()}\n{self.output()[-3000:]}")

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             http_client=httpx.Client(trust_env=False, timeout=60))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()  # the Ray head's processes share its fate
                self.process.wait(timeout=30)
        self.http.close()
        self.log.close()


@pytest.fixture(scope="module")
def cluster(artifact, tmp_path_factory):
    served = Cluster(artifact("tiny"), tmp_path_factory.mktemp("replicas") / "serve.log")
    try:
        served.wait_ready(READY_S)
        yield served
    finally:
        served.close()


@pytest.fixture(scope="module")
def single(artifact):
    served = Served(create_app(artifact("tiny"), model_name="tiny"))
    yield served
    served.close()


def comparable(value):
    """A response or chunk as JSON, less what differs between any two answers: id, created, and the prompt tokens
    found in the prefix cache (each engine's cache holds what it has served)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in ("id", "created", "prompt_tokens_details")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def events(answer: httpx.Response) -> list:
    """A stream's events: JSON objects, and "[DONE]"."""
    blocks = [block for block in answer.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks), answer.text[:300]
    return [block[6:] if block == "data: [DONE]" else json.loads(block[6:]) for block in blocks]


def test_answers_equal_the_single_process_servers(cluster, single):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    requests = [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True}),
        ("/v1/completions", {"prompt": [[464, 10730, 29598], [15496, 995]], "max_tokens": 8, "n": 2,
                             "temperature": 0.9, "top_p": 0.95, "seed": 11}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}, "return_token_ids": True}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 10, "temperature": 0}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 10, "temperature": 0, "stream": True}),
        ("/v1/completions", {"prompt": PROMPT, "temperature": 5}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/tokenize", {"prompt": PROMPT}),
    ]
    for path, body in requests:
        ours, theirs = cluster.post(path, body), single.http.post(path, json=body)
        assert ours.status_code == theirs.status_code, (path, body, ours.text)
        if body.get("stream"):
            assert comparable(events(ours)) == comparable(events(theirs)), body
        else:
            assert comparable(ours.json()) == comparable(theirs.json()), body
        assert ours.status_code != 200 or ours.headers["x-gptj-replica"] in cluster.replicas()
    assert cluster.http.get("/v1/models").json() == single.http.get("/v1/models").json()
    missing = cluster.http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    ours, theirs = cluster.client(), single.client()  # OpenAI's own client, stream and not
    for stream in (False, True):
        options = dict(model="tiny", messages=chat, max_tokens=8, temperature=0.7, seed=3, stream=stream)
        a, b = ours.chat.completions.create(**options), theirs.chat.completions.create(**options)
        a, b = ([c.model_dump() for c in x] if stream else x.model_dump() for x in (a, b))
        assert comparable(a) == comparable(b)


def test_each_conversation_stays_on_the_replica_that_holds_it(cluster, single):
    conversations = [[{"role": "system", "content": "Answer in a word."},
                      {"role": "user", "content": f"Conversation {i}: what comes next?"}] for i in range(4)]
    served = [[] for _ in conversations]
    for turn in range(4):
        for i, messages in enumerate(conversations):
            body = {"messages": messages, "max_tokens": 5, "temperature": 0}
            answer = cluster.post("/v1/chat/completions", body)
            assert answer.status_code == 200, answer.text
            reply, alone = answer.json(), single.http.post("/v1/chat/completions", json=body).json()
            assert reply["choices"] == alone["choices"]
            served[i].append((answer.headers["x-gptj-replica"], reply["usage"]))
            messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                         {"role": "user", "content": f"and after turn {turn}?"}]
    for turns in served:
        assert len({replica for replica, _ in turns}) == 1, turns
        for (_, before), (_, after) in zip(turns, turns[1:]):
            # the whole earlier prompt came from that replica's prefix cache: only it held this conversation
            assert after["prompt_tokens_details"]["cached_tokens"] >= before["prompt_tokens"] - 1, turns


def test_a_replica_without_room_passes_the_next_turn_to_the_least_loaded(cluster):
    shared = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. " * 2)[:128]
    assert len(shared) >= 2 * BLOCK_CHARS
    first = cluster.post("/v1/completions", {"prompt": shared + "Start", "max_tokens": 2, "temperature": 0})
    home = first.headers["x-gptj-replica"]

    async def load():
        async with httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=60) as http:
            started, holders = asyncio.Event(), []

            async def hold(i: int):
                body = {"prompt": shared + f" {i}", "max_tokens": 80, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as answer:
                    holders.append(answer.headers["x-gptj-replica"])
                    if len(holders) == MAX_BATCH:
                        started.set()
                    async for _ in answer.aiter_lines():
                        pass

            streams = [asyncio.create_task(hold(i)) for i in range(MAX_BATCH)]
            await asyncio.wait_for(started.wait(), 60)
            overflow = await http.post("/v1/completions", json={"prompt": shared + " next", "max_tokens": 2})
            await asyncio.wait_for(asyncio.gather(*streams), 120)
            return holders, overflow.headers["x-gptj-replica"]

    holders, overflowed = asyncio.run(load())
    assert holders == [home] * MAX_BATCH  # the shared prefix's replica, while it had a free slot
    assert overflowed != home  # full: to the least loaded
    after = cluster.post("/v1/completions", {"prompt": shared + " later", "max_tokens": 2})
    assert after.headers["x-gptj-replica"] == overflowed  # where the prefix went last


def test_metrics_carry_every_replica_and_the_ingress(cluster):
    replicas = cluster.replicas()
    families = {f.name: f for f in text_string_to_metric_families(cluster.http.get("/metrics").text)}
    generated = {s.labels["replica"]: s.value for s in families["gptj_tvm_generation_tokens"].samples
                 if s.name.endswith("_total")}
    assert set(generated) == set(replicas) and all(v > 0 for v in generated.values())  # both have served
    for name in ("gptj_tvm_requests_running", "gptj_tvm_time_to_first_token_seconds", "gptj_tvm_prefix_cache_hits"):
        assert {s.labels["replica"] for s in families[name].samples} == set(replicas), name
    routed = {s.labels["rule"]: s.value for s in families["gptj_tvm_routed_requests"].samples
              if s.name.endswith("_total")}
    assert routed["affinity"] >= 12 and routed["overflow"] >= 1  # the two tests above
    errors = [s for s in families["gptj_tvm_request_errors"].samples if s.name.endswith("_total")]
    assert {s.labels["status"] for s in errors if s.labels["replica"] != "ingress"} >= {"400"}


def test_a_client_that_goes_away_cancels_its_engine_requests(cluster):
    def engine_totals() -> tuple[float, float]:
        samples = [s for f in text_string_to_metric_families(cluster.http.get("/metrics").text) for s in f.samples
                   if s.labels.get("replica") != "ingress"]
        aborted = sum(s.value for s in samples if s.name == "gptj_tvm_request_finished_total"
                      and s.labels["finish_reason"] == "abort")
        return aborted, sum(s.value for s in samples if s.name == "gptj_tvm_generation_tokens_total")

    aborted, generated = engine_totals()
    body = {"prompt": [4321] * 20, "max_tokens": 105, "ignore_eos": True}
    with cluster.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as answer:
        assert next(line for line in answer.iter_lines() if line.startswith("data: {"))
    with pytest.raises(httpx.TimeoutException):  # a whole answer the client stops waiting for
        cluster.http.post("/v1/completions", json=body, timeout=0.05)
    deadline = time.monotonic() + 10
    while engine_totals()[0] < aborted + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    now_aborted, now_generated = engine_totals()
    assert now_aborted == aborted + 2 and now_generated - generated < 2 * 105


def test_a_killed_replica_loses_only_its_running_streams(cluster, single):
    bodies = [{"prompt": [1000 + 37 * i + k for k in range(20)], "max_tokens": 90, "temperature": 0,
               "ignore_eos": True, "return_token_ids": True, "stream": i % 3 != 2} for i in range(18)]
    replicas = cluster.replicas()

    async def one(http, body, first_tokens: asyncio.Queue):
        if not body["stream"]:
            answer = await http.post("/v1/completions", json=body)
            return answer.status_code, answer.headers.get("x-gptj-replica"), answer.json()
        async with http.stream("POST", "/v1/completions", json=body) as answer:
            replica, lines = answer.headers.get("x-gptj-replica"), []
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    if not lines:
                        first_tokens.put_nowait(replica)
                    lines.append(line[6:])
            return answer.status_code, replica, lines

    async def load_and_kill():
        async with httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=120) as http:
            first_tokens = asyncio.Queue()
            tasks = [asyncio.create_task(one(http, body, first_tokens)) for body in bodies]
            victim = await asyncio.wait_for(first_tokens.get(), 60)
            os.kill(replicas[victim]["pid"], signal.SIGKILL)
            return victim, await asyncio.wait_for(asyncio.gather(*tasks), 180)

    victim, answers = asyncio.run(load_and_kill())
    lost = 0
    for body, (status, replica, answer) in zip(bodies, answers):
        reference = single.http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
        assert status == 200, answer
        if not body["stream"]:  # a whole answer is sent again if its replica fails: always answered
            assert answer["choices"][0]["token_ids"] == reference["token_ids"]
            continue
        assert answer[-1] == "[DONE]"
        chunks = [json.loads(line) for line in answer[:-1]]
        ids = [t for c in chunks if c.get("choices") for t in c["choices"][0].get("token_ids", [])]
        if "error" in chunks[-1]:  # it was running on the killed replica: cut, and said so
            lost += 1
            assert replica == victim and chunks[-1]["error"]["code"] == "replica_failed"
            assert chunks[-2]["choices"][0]["finish_reason"] == "error"
            assert ids == reference["token_ids"][:len(ids)]
        else:
            assert ids == reference["token_ids"] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert 1 <= lost <= MAX_BATCH
    back = cluster.wait_ready(120, without=victim)  # Ray Serve starts another in its place
    answer = cluster.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200 and answer.headers["x-gptj-replica"] in back
    families = {f.name: f for f in text_string_to_metric_families(cluster.http.get("/metrics").text)}
    assert {s.labels["replica"] for s in families["gptj_tvm_requests_running"].samples} == set(back)
    lost_metric = [s.value for s in families["gptj_tvm_replica_lost_streams"].samples if s.name.endswith("_total")]
    assert lost_metric == [lost]


def test_sigterm_drains_every_replica(cluster):
    async def drain():
        async with httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=60) as http:
            started = asyncio.Queue()

            async def stream(i: int):
                body = {"prompt": [2000 + 41 * i + k for k in range(20)], "max_tokens": 100, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as answer:
                    lines = []
                    async for line in answer.aiter_lines():
                        if line.startswith("data: "):
                            if not lines:
                                started.put_nowait(i)
                            lines.append(line[6:])
                    return lines

            streams = [asyncio.create_task(stream(i)) for i in range(2 * MAX_BATCH)]
            for _ in streams:
                await asyncio.wait_for(started.get(), 60)
            cluster.process.send_signal(signal.SIGTERM)
            refused = None
            for _ in range(50):  # the drain starts within the CLI's half-second wait
                refused = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                if refused.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            return refused, await asyncio.wait_for(asyncio.gather(*streams), 120)

    refused, streams = asyncio.run(drain())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    for lines in streams:  # 100 tokens each, well within --drain-seconds 20: all finish
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    assert cluster.process.wait(timeout=90) == 0
    output = cluster.output()
    assert "drained 2 replicas" in output and "Traceback" not in output


def test_cli_refuses_bad_replica_flags_in_one_line(artifact, monkeypatch, capsys):
    tiny = str(artifact("tiny"))
    cases = [(["--replicas", "0"], "at least 1"), (["--ray-address", "x:1"], "need --replicas"),
             (["--replicas", "2", "--min-replicas", "1"], "both"),
             (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "3"], "must lie in")]
    for flags, message in cases:
        assert cli_main(["serve", tiny, *flags]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert cli_main(["serve", tiny, "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert "pip install -e '.[cluster]'" in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--help"])
    assert exited.value.code == 0 and "--replicas" in capsys.readouterr().out


def test_affinity_keys_follow_a_conversation():
    def chat(*messages):
        return affinity_keys("/v1/chat/completions", {"messages": [{"role": r, "content": c} for r, c in messages]})

    turn1 = chat(("system", "Be brief."), ("user", "Hi"))
    assert turn1 and turn1 == chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "More"))
    assert turn1 != chat(("system", "Be brief."), ("user", "Bye"))  # a system prompt alone is no conversation
    text = "x" * (3 * BLOCK_CHARS + 5)
    keys = affinity_keys("/v1/completions", {"prompt": text})
    assert len(keys) == 3 and affinity_keys("/v1/completions", {"prompt": text + " and more"})[-3:] == keys
    assert affinity_keys("/v1/completions", {"prompt": "short"}) == ()
    assert affinity_keys("/v1/completions", {"prompt": list(range(40))}) == \
        affinity_keys("/v1/completions", {"prompt": [list(range(33)), [1]]})[-2:]
    assert affinity_keys("/v1/models", None) == () and affinity_keys("/v1/completions", {"prompt": 5}) == ()
