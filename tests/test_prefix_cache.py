"""The prefix cache (runtime/prefix_cache.py): a request whose prompt begins with rows a slot still holds starts
there, and its tokens and log-probabilities are bitwise those of a cold engine (and its logits the numpy GPT-J's):
hits in the middle of a prefill chunk and at its boundary, a whole prompt cached, a chat turn over decoded rows,
an evicted prefix, and a prefix copied from a running sequence's slot."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from gptj_tvm.runtime.engine import SamplingParams, TokenEvent
from gptj_tvm.runtime.prefix_cache import SlotPrefixes
from reference import rel_max_error

TOLERANCE = {"tiny": 1e-4, "bfloat16": 2e-2, "q4": None}  # q4: against the cold engine only


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(0, vocab, length)] for _ in range(n)]


def submit(engine, prompt, max_tokens=4):
    events = []
    request = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, logprobs=5), events.append)
    return request, events


def tokens(events) -> list[tuple]:
    return [(e.token, e.logprob, tuple(e.top_logprobs)) for e in events if isinstance(e, TokenEvent)]


def cold(gen, prompt, max_tokens=4) -> list[tuple]:
    engine = gen.engine(max_batch=1, prefill_chunk=8, prefix_cache=False)
    _, events = submit(engine, prompt, max_tokens)
    engine.run_until_idle()
    return tokens(events)


@pytest.fixture(scope="module")
def models(generator, checkpoint, tmp_path_factory):
    import gptj_tvm
    from gptj_tvm.compiler.compile import compile_model

    folder = tmp_path_factory.mktemp("prefix") / "tiny-q4"
    compile_model(checkpoint("tiny"), folder, quantization="q4", progress=False)
    return {"tiny": generator("tiny"), "bfloat16": generator("bfloat16"), "q4": gptj_tvm.load(folder)}


@pytest.mark.parametrize("name", ["tiny", "bfloat16", "q4"])
def test_hits_are_bitwise_the_cold_engines_tokens_and_logprobs(name, models, reference):
    gen = models[name]
    base, other = prompts(gen.vocab_size, 2, 24, seed=1)
    decoded = [t for t, *_ in cold(gen, base, max_tokens=6)]
    cases = {  # (prompt after base ran, rows it reuses)
        "mid-chunk": (base[:13] + other[:7], 13),  # the first chunk it runs starts inside a chunk of 8
        "chunk boundary": (base[:16] + other[:5], 16),
        "whole prompt": (list(base), 23),  # every row but the last: the last still gives the logits
        "chat turn": (base + decoded[:-1] + other[:6], 24 + 5),  # rows the decode steps wrote
    }
    for case, (prompt, hits) in cases.items():
        engine = gen.engine(max_batch=2, prefill_chunk=8)
        submit(engine, base, max_tokens=6)
        engine.run_until_idle()
        request, events = submit(engine, prompt)
        engine.run_until_idle()
        assert request.cached_tokens == hits, case
        assert tokens(events) == cold(gen, prompt), case
        if TOLERANCE[name] is not None:  # the first token's log-probabilities against the numpy GPT-J
            logits = reference(name).logits(prompt)[-1].astype(np.float64)
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            top = tokens(events)[0][2]
            assert rel_max_error(np.array([lp for _, lp in top]), logp[[t for t, _ in top]]) < TOLERANCE[name], case


def test_an_evicted_prefix_is_prefilled_again(models):
    gen = models["tiny"]
    engine = gen.engine(max_batch=1, prefill_chunk=8)
    a, b = prompts(gen.vocab_size, 2, 12, seed=2)
    for prompt in (a, b):
        submit(engine, prompt)
        engine.run_until_idle()
    request, events = submit(engine, a[:10] + b[:3])  # b's rows replaced a's in the only slot
    engine.run_until_idle()
    assert request.cached_tokens == 0 and tokens(events) == cold(gen, a[:10] + b[:3])


def test_a_running_sequences_prefix_is_copied_into_a_free_slot(models):
    """Two users behind one system prompt: the second arrives while the first decodes, takes another slot, and
    starts from the first's rows (copied), every token equal to a cold run."""
    gen = models["tiny"]
    engine = gen.engine(max_batch=3, prefill_chunk=8)
    system, question_a, question_b = prompts(gen.vocab_size, 3, 20, seed=3)
    first, first_events = submit(engine, system + question_a[:4], max_tokens=10)
    for _ in range(4):  # 24 prompt tokens in chunks of 8, then a decode step
        engine.step()
    second, second_events = submit(engine, system + question_b[:6], max_tokens=5)
    engine.run_until_idle()
    assert second.slot != first.slot and second.cached_tokens == 20
    assert tokens(second_events) == cold(gen, system + question_b[:6], 5)
    assert tokens(first_events) == cold(gen, system + question_a[:4], 10)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 20 and stats["prefix_cache_queries"] == 24 + 26


def test_generate_batch_reports_the_reused_prompt_tokens(models):
    gen = models["tiny"]
    system, a, b = prompts(gen.vocab_size, 3, 16, seed=4)
    batch = [system + a[:3], system + b[:5]]
    with_cache = gen.generate_batch(batch, max_new_tokens=5, max_batch=1)
    without = gen.generate_batch(batch, max_new_tokens=5, max_batch=1, prefix_cache=False)
    assert [g.stats["cached_prompt_tokens"] for g in with_cache] == [0, 16]
    assert [g.stats["cached_prompt_tokens"] for g in without] == [0, 0]
    assert [g.ids for g in with_cache] == [g.ids for g in without] == [gen.generate(p, max_new_tokens=5).ids
                                                                     for p in batch]


def test_placement_prefers_the_longest_prefix_then_the_least_recently_used():
    p = SlotPrefixes(3)
    p.wrote(0, 0, [1, 2, 3, 4])
    p.wrote(1, 0, [1, 2, 9])
    p.wrote(2, 0, [7, 7])
    # slot 0 holds the longest prefix and is the least recently used: taken, its 4th row to be overwritten
    assert p.place([1, 2, 3, 5], free=[0, 1, 2], busy=[]).__dict__ == {"slot": 0, "reused": 3, "copy_from": None}
    # slot 0 is busy now: its 3 rows are copied into the least recently used free slot (1)
    assert p.place([1, 2, 3, 8, 8], free=[1, 2], busy=[0]).__dict__ == {"slot": 1, "reused": 3, "copy_from": 0}
    assert p.tokens[1] == [1, 2, 3]
    assert p.place([5], free=[2], busy=[0, 1]).reused == 0  # the last prompt token is always computed
    assert (p.queried, p.hits) == (4 + 5 + 1, 6)
    # an idle slot holding more than the shared prefix keeps it: the prefix goes to the older free slot
    q = SlotPrefixes(2)
    q.wrote(0, 0, [1, 2, 3, 4, 5])
    assert q.place([1, 2, 9], free=[0, 1], busy=[]).__dict__ == {"slot": 1, "reused": 2, "copy_from": 0}
    assert q.tokens == [[1, 2, 3, 4, 5], [1, 2]]


def test_the_server_reports_cached_tokens_and_counts_queries_and_hits(artifact, generator):
    from test_serve import Served

    from gptj_tvm.runtime.server import create_app

    gen = generator("tiny")
    (prompt,) = prompts(gen.vocab_size, 1, 30, seed=5)
    served = Served(create_app(artifact("tiny"), max_batch=2, model_name="tiny"))
    cold_server = Served(create_app(artifact("tiny"), max_batch=2, model_name="tiny", prefix_cache=False))
    try:
        client = served.client()
        first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        chunks = list(client.completions.create(model="tiny", prompt=prompt + prompt[:5], max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 30
        alone = gen.generate(prompt + prompt[:5], max_new_tokens=4)
        assert "".join(c.choices[0].text for c in chunks[:-1]) == alone.text
        assert served.metric("gptj_tvm_prefix_cache_queries_total") == 30 + 35
        assert served.metric("gptj_tvm_prefix_cache_hits_total") == 30
        cold_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        again = cold_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 0 and again.choices[0].text == first.choices[0].text
        # vLLM's fields that benchmark clients send: honoured, and checked
        fixed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True, "min_tokens": 6})
        assert fixed.usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"min_tokens": 3})
        assert raised.value.body["param"] == "min_tokens"
    finally:
        served.close()
        cold_server.close()


def test_min_tokens_and_ignore_eos_as_vllm_defines_them(reference, serve_tiny_with_eos):
    """With a frequent token made the stop token: min_tokens keeps it from being sampled for that many tokens (the
    token there is the numpy GPT-J's best other one); ignore_eos runs on past it to max_tokens."""
    gen, eos = serve_tiny_with_eos
    prompt = gen.tokenizer.encode("Once upon a time")
    plain = gen.generate(prompt, max_new_tokens=10)
    assert plain.finish_reason == "eos" and plain.ids[-1] == eos
    held = gen.generate(prompt, max_new_tokens=10, min_new_tokens=len(plain.ids) + 1)
    n = len(plain.ids) - 1
    assert held.ids[:n] == plain.ids[:n] and eos not in held.ids[:n + 1]
    logits = reference("tiny").logits(prompt + plain.ids[:n])[-1]
    logits[eos] = -np.inf
    assert held.ids[n] == int(np.argmax(logits))
    ignored = gen.generate(prompt, max_new_tokens=10, ignore_eos=True)
    assert len(ignored.ids) == 10 and ignored.ids[:n + 1] == plain.ids and ignored.finish_reason == "length"
    batched = gen.generate_batch([prompt, prompt], max_new_tokens=10, min_new_tokens=n + 1)
    assert [b.ids for b in batched] == [held.ids, held.ids]


@pytest.fixture
def serve_tiny_with_eos(artifact, tmp_path):
    """The tiny artifact with its 4th greedy token of "Once upon a time" as the stop token (a runtime setting)."""
    import json
    import shutil

    import gptj_tvm

    folder = tmp_path / "eos-artifact"
    shutil.copytree(artifact("tiny"), folder)
    gen = gptj_tvm.load(folder)
    eos = gen.generate("Once upon a time", max_new_tokens=10).ids[3]
    meta = json.loads((folder / "metadata.json").read_text())
    meta["stop_token_ids"] = [eos]
    (folder / "metadata.json").write_text(json.dumps(meta))
    return gptj_tvm.load(folder), eos


def test_users_arriving_together_share_one_prefill_of_their_system_prompt(models):
    gen = models["tiny"]
    system, *questions = prompts(gen.vocab_size, 4, 40, seed=6)
    batch = [system + q[:3 + i] for i, q in enumerate(questions)]
    results = gen.generate_batch(batch, max_new_tokens=4, max_batch=3, prefill_chunk=8)
    assert [r.stats["cached_prompt_tokens"] for r in results] == [0, 40, 40]
    assert [r.ids for r in results] == [gen.generate(p, max_new_tokens=4).ids for p in batch]
