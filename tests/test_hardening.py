"""Requests that used to get a 500 or tie up the engine (issue 33's list), sent raw with httpx as a client would,
each answered with OpenAI's error object and a 4xx, the server answering normally afterwards."""

from __future__ import annotations

import pytest

from test_serve import PROMPT, Served

from gptj_tvm.runtime.server import create_app

KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def served(artifact):
    server = Served(create_app(artifact("tiny"), max_batch=2, model_name="tiny"))
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


def damaged_copy(artifact, tmp_path, name: str, damage) -> str:
    import shutil

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
