"""Requests that used to get a 500 or tie up the engine (issue 33's list), sent raw with httpx as a client would,
each answered with OpenAI's error object and a 4xx, the server answering normally afterwards."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest

from test_serve import PROMPT, Served, wait_until

from gptj_tvm.runtime.server import create_app, server_for

KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def served(artifact):
    app = create_app(artifact("tiny"), max_batch=2, model_name="tiny", header_timeout=1.0)
    server = Served(app, server=server_for(app))  # as `serve` runs it
    yield server
    server.close()


def post(served, path: str, body: str):
    return served.http.post(path, content=body.encode("utf-8"), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfff"], "max_tokens": 1}', "prompt.1"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages.0.role"),
    ("/v1/completions", '{"prompt": "hi", "model": "\\ud800"}', "model"),
    ("/tokenize", '{"prompt": "\\udbff"}', "prompt"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(served, path, body, param):
    answer = post(served, path, body)
    assert answer.status_code == 400 and set(answer.json()["error"]) == KEYS
    assert answer.json()["error"]["param"] == param and "surrogate" in answer.json()["error"]["message"]


@pytest.mark.parametrize("depth", [100, 1000, 5000])
def test_json_nested_past_the_limit_is_a_400(served, depth):
    answer = post(served, "/v1/completions", '{"prompt": "hi", "x": ' + "[" * depth + "]" * depth + "}")
    assert answer.status_code == 400 and "nests past" in answer.json()["error"]["message"]


def test_a_wrong_method_is_an_invalid_request_and_a_full_stop_list_is_refused(served):
    answer = served.http.get("/v1/completions")
    assert answer.status_code == 405 and answer.json()["error"]["type"] == "invalid_request_error"
    assert all(served.http.get(path).status_code == 404 for path in ("/docs", "/redoc", "/openapi.json"))
    for stop in (["x"] * 17, ["y" * 257]):
        answer = served.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": stop})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop"
    fine = served.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": ["x"] * 16})
    assert fine.status_code == 200 and served.http.get("/health").status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0"),
])
def test_loose_types_are_400s_as_openai_answers_them(served, path, body, param):
    answer = served.http.post(path, json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(served):
    limit = served.state.slot_len * served.state.longest_token
    answer = served.http.post("/v1/completions", json={"prompt": "a " * limit, "max_tokens": 1})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    ok = served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_a_connection_that_sends_half_a_header_is_closed(served):
    url = httpx.URL(served.url)
    with socket.create_connection((url.host, url.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed, with nothing sent
        assert 0.9 < time.monotonic() - start < 5
    # a client that keeps its connection and sends whole requests slower than the timeout is served throughout
    for _ in range(2):
        assert served.http.get("/health").status_code == 200
        time.sleep(1.2)
    assert served.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 200


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_an_unexpected_failure_is_a_500_logged_once(served):
    tokenizer = served.state.gen.tokenizer
    records, logger = Records(), logging.getLogger("uvicorn.error")
    logger.addHandler(records)

    def fail(texts):
        raise RuntimeError("a bug")

    tokenizer.encode_batch = fail
    try:
        answer = served.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        # uvicorn logs the exception Starlette re-raises after the 500 has gone out: wait for it, then a moment
        # more for a second record, were there one
        deadline = time.monotonic() + 10
        while not any(r.exc_info for r in records.records) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        del tokenizer.encode_batch
        logger.removeHandler(records)
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
    assert [r.exc_info[1].args for r in records.records if r.exc_info] == [("a bug",)]
    assert served.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_a_drain_answers_503_and_ends_every_stream_with_done(artifact):
    app = create_app(artifact("tiny"), max_batch=4, model_name="tiny", drain_seconds=1.0)
    runner = server_for(app)
    server = Served(app, server=runner)
    executor = server.state.engine.executor
    real_execute = executor.execute
    executor.execute = lambda plan: (time.sleep(0.05), real_execute(plan))[1]  # a step as slow as a big model's
    answers = {}

    def send(name: str, max_tokens: int, stream: bool) -> None:
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json=body) as answer:
                    answers[name] = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
            else:
                answer = http.post("/v1/completions", json=body)
                answers[name] = (answer.status_code, answer.json())

    senders = [threading.Thread(target=send, args=args) for args in
               [("short", 4, True), ("long", 100, True), ("whole", 100, False)]]
    try:
        for sender in senders:
            sender.start()
        wait_until(lambda: server.state.engine.stats()["running"] == 3, 30, "three running requests")
        runner.handle_exit(signal.SIGTERM, None)  # what the signal calls, on a thread that cannot take signals
        health = server.http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        late = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        for sender in senders:
            sender.join(30)
        server.thread.join(30)
        assert not server.thread.is_alive()  # the server stopped of itself once the drain was over
    finally:
        server.close()
    short = [json.loads(data) for data in answers["short"][:-1]]
    assert answers["short"][-1] == "[DONE]" and short[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in short) != ""
    *_, ended, error, done = answers["long"]
    assert json.loads(ended)["choices"][0]["finish_reason"] == "error" and done == "[DONE]"
    assert json.loads(error)["error"]["code"] == "draining"
    assert answers["whole"][0] == 503 and answers["whole"][1]["error"]["code"] == "draining"


def damaged_copy(artifact, tmp_path, name: str, damage) -> str:
    folder = tmp_path / f"damaged-{name}"
    shutil.copytree(artifact("tiny"), folder)
    damage(folder / name)
    return str(folder)


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(4096)


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)


@pytest.mark.parametrize("name,damage", [("model.so", truncate), ("model.so", flip_a_byte),
                                         ("tokenizer.json", flip_a_byte)])
def test_a_damaged_library_or_tokenizer_is_one_line_not_a_signal(artifact, tmp_path, capsys, name, damage):
    """A truncated library used to be mapped and die of SIGBUS; one changed at the same size ran unchecked."""
    from test_cli import assert_one_line_error, run

    folder = damaged_copy(artifact, tmp_path, name, damage)
    code, _, err = run(["generate", folder, "--prompt", PROMPT, "--max-new-tokens", "2"], capsys)
    assert_one_line_error(code, err, name, "sha256")


def edit_metadata(folder, change) -> None:
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change,says", [
    (lambda m: m["config"].update(n_layer=3), "config.n_layer is 3 there, 2 in the library"),
    (lambda m: m["config"].update(n_positions=4096), "config.n_positions is 4096 there, 128 in the library"),
    (lambda m: m.update(dtype="bfloat16"), "dtype is 'bfloat16' there, 'float32' in the library"),
    (lambda m: m.update(params=m["params"][::-1]), "its weights are not the ones model.so takes"),
])
def test_metadata_that_disagrees_with_the_library_is_refused_in_one_line(artifact, tmp_path, capsys, change, says):
    """n_layer 2 -> 3 used to load and fail every request; n_positions 128 -> 4096 to corrupt the heap."""
    from test_cli import assert_one_line_error, run

    folder = tmp_path / "edited"
    shutil.copytree(artifact("tiny"), folder)
    edit_metadata(folder, change)
    code, _, err = run(["generate", folder, "--prompt", PROMPT, "--max-new-tokens", "2"], capsys)
    assert_one_line_error(code, err, "metadata.json", says)


def test_weights_are_checked_against_the_library_and_with_verify_their_sha256(artifact, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    from test_cli import assert_one_line_error, run

    from gptj_tvm.runtime.artifact import file_sha256

    folder = tmp_path / "weights"
    shutil.copytree(artifact("tiny"), folder)
    (weights,) = folder.glob("params-*.safetensors")
    args = ["generate", folder, "--prompt", PROMPT, "--max-new-tokens", "2"]
    original = weights.read_bytes()

    # the same size, one bit changed: only the sha256 tells, so only --verify (about 1 s a GB) refuses it
    damaged = bytearray(original)
    damaged[-5] ^= 0x01
    weights.write_bytes(damaged)
    assert run(args, capsys)[0] == 0
    assert_one_line_error(*run([*args, "--verify"], capsys)[::2], weights.name, "sha256")

    # a weight of another shape, its size and sha256 recorded as if compile wrote it: the library's manifest tells
    weights.write_bytes(original)
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.ndim == 2 and t.shape[0] != t.shape[1])
    tensors[name] = tensors[name].T.copy()
    save_file(tensors, weights)
    edit_metadata(folder, lambda m: m["weight_files"][weights.name].update(bytes=weights.stat().st_size,
                                                                           sha256=file_sha256(weights)))
    assert_one_line_error(*run(args, capsys)[::2], f"weight {name} is float32", "the library takes float32")
