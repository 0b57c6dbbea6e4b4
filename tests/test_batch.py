"""Continuous batching (runtime/engine.py over runtime/executors.py's batched step): the step against the numpy
GPT-J, and every request equal to `generate` alone, whatever runs beside it."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from gptj_tvm.core.errors import GptjError
from gptj_tvm.runtime.engine import FinishEvent, QueueFull, SamplingParams, TokenEvent
from reference import rel_max_error

TOLERANCE = {"tiny": 1e-4, "odd": 1e-4, "bfloat16": 2e-2}


def random_prompts(gen, lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(0, gen.vocab_size, n)] for n in lengths]


# "gpu-on-cpu": the CUDA artifact's graph, thread-block kernels included, compiled for this CPU
@pytest.mark.parametrize("name,variant", [("tiny", "cpu"), ("odd", "cpu"), ("bfloat16", "cpu"),
                                          ("odd", "gpu-on-cpu")])
def test_a_mixed_step_gives_each_row_its_own_sequences_logits(name, variant, generator, reference):
    """Rows of three sequences in one step, in any order (a prefill chunk, a whole prompt, a decode token over
    an earlier chunk), each against the numpy GPT-J's logits of its own sequence."""
    gen = generator(name, variant=variant)
    caches = gen.new_slot_caches(3, 32)
    seqs = random_prompts(gen, (6, 3, 5))
    expected = [reference(name).logits(s) for s in seqs]

    def step(ids, slots, positions, rows):
        def tensor(values, shape=(-1,)):
            return tvm.runtime.tensor(np.asarray(values, dtype=np.int32).reshape(shape))

        out = gen.run_step(tensor(ids, (1, -1)), tensor(slots), tensor(positions), tensor(rows), caches)
        return out.numpy()[0, :, :gen.vocab_size]

    # sequence 2's first 4 tokens, all of sequence 1 (slot 0), sequence 0's first 5 (slot 1)
    first = step(seqs[2][:4] + seqs[1] + seqs[0][:5], [2] * 4 + [0] * 3 + [1] * 5,
                 [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [3, 6, 11])
    # then sequence 0's last token and sequence 2's last, as two decode rows
    second = step([seqs[0][5], seqs[2][4]], [1, 2], [5, 4], [0, 1])
    pairs = [(first[0], expected[2][3]), (first[1], expected[1][2]), (first[2], expected[0][4]),
             (second[0], expected[0][5]), (second[1], expected[2][4])]
    for actual, want in pairs:
        assert rel_max_error(actual, want) < TOLERANCE[name]


@pytest.mark.parametrize("name", ["tiny", "odd", "bfloat16"])
def test_generate_batch_gives_each_prompt_what_generate_gives_it_alone(name, generator):
    """More prompts than slots (they queue), prompts longer than a step's prefill budget (chunked), greedy and
    seeded sampling: the ids and text of each equal its solo run, token for token."""
    gen = generator(name)
    prompts = random_prompts(gen, (3, 17, 1, 9, 30, 5), seed=1)
    for options in ({"max_new_tokens": 12}, {"max_new_tokens": 9, "temperature": 0.8, "top_k": 20, "seed": 3}):
        batched = gen.generate_batch(prompts, max_batch=3, **options)
        for prompt, result in zip(prompts, batched):
            alone = gen.generate(prompt, **options)
            assert result.ids == alone.ids and result.text == alone.text
            assert result.finish_reason == alone.finish_reason


def test_stop_strings_and_end_of_text_end_requests_as_generate_does(generator):
    gen = generator("tiny")
    prompts = ["Once upon a time", "The quick brown fox", "Hello there"]
    batched = gen.generate_batch(prompts, max_new_tokens=20, temperature=1.0, seed=11, stop=["e", "a"])
    for prompt, result in zip(prompts, batched):
        alone = gen.generate(prompt, max_new_tokens=20, temperature=1.0, seed=11, stop=["e", "a"])
        assert (result.text, result.finish_reason) == (alone.text, alone.finish_reason)


def test_prefill_chunks_interleave_with_running_decodes(generator):
    """A long prompt arrives while a sequence decodes: every step still carries the decode row, and the long
    prompt is prefilled a chunk per step."""
    gen = generator("tiny")
    engine = gen.engine(max_batch=2, prefill_chunk=8)
    short, long = random_prompts(gen, (2, 40), seed=2)
    events = {0: [], 1: []}
    engine.submit(short, SamplingParams(max_tokens=12), events[0].append)
    engine.step()  # the short prompt, prefilled whole: its first token
    engine.submit(long, SamplingParams(max_tokens=3), events[1].append)
    tokens_per_step = []
    while engine.step():
        tokens_per_step.append(sum(isinstance(e, TokenEvent) for e in events[0]))
    # 40 tokens in chunks of 8: five steps of prefill, in each of which the short sequence got a token
    assert tokens_per_step[:5] == [2, 3, 4, 5, 6]
    assert [e.token for e in events[0] if isinstance(e, TokenEvent)] == gen.generate(short, max_new_tokens=12).ids
    assert [e.token for e in events[1] if isinstance(e, TokenEvent)] == gen.generate(long, max_new_tokens=3).ids


def test_a_cancelled_request_frees_its_slot_at_the_next_step(generator):
    gen = generator("tiny")
    engine = gen.engine(max_batch=1, max_queue=1)
    first, second = random_prompts(gen, (4, 4), seed=3)
    events = []
    request = engine.submit(first, SamplingParams(max_tokens=50), events.append)
    waiting = engine.submit(second, SamplingParams(max_tokens=2), lambda e: None)
    with pytest.raises(QueueFull, match="waiting"):
        engine.submit(second, SamplingParams(max_tokens=2), lambda e: None)
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    request.cancel()
    engine.step()
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "cancelled"
    assert engine.stats()["slots_used"] == 1 and waiting.slot is not None  # the waiting one took the slot
    engine.run_until_idle()
    assert waiting.finish_reason == "length" and engine.stats()["slots_used"] == 0


def test_a_request_ends_where_its_slot_ends_and_bad_prompts_are_refused(generator):
    gen = generator("tiny")
    engine = gen.engine(max_batch=2, positions=10)
    (prompt,) = random_prompts(gen, (6,), seed=4)
    request = engine.submit(prompt, SamplingParams(max_tokens=50), lambda e: None)
    engine.run_until_idle()
    assert request.finish_reason == "context" and len(request.tokens) == 4  # 6 + 4 positions fill the slot
    with pytest.raises(GptjError, match="at most 9 prompt tokens"):
        engine.submit(prompt + prompt, SamplingParams(), lambda e: None)
    with pytest.raises(GptjError, match="outside the vocabulary"):
        engine.submit([gen.vocab_size], SamplingParams(), lambda e: None)


def test_logprobs_are_the_models_log_softmax(generator):
    gen = generator("tiny")
    engine = gen.engine()
    (prompt,) = random_prompts(gen, (5,), seed=5)
    events = []
    engine.submit(prompt, SamplingParams(max_tokens=1, logprobs=3), events.append)
    engine.run_until_idle()
    token = events[0]
    logits = gen.logits(prompt)[-1].astype(np.float64)
    expected = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert token.token == int(np.argmax(logits))
    assert abs(token.logprob - expected[token.token]) < 1e-5
    assert [i for i, _ in token.top_logprobs] == list(np.argsort(-expected)[:3])


@pytest.fixture(scope="module")
def q4_generator(checkpoint, tmp_path_factory):
    import gptj_tvm
    from gptj_tvm.compiler.compile import compile_model

    folder = tmp_path_factory.mktemp("batch") / "tiny-q4"
    compile_model(checkpoint("tiny"), folder, quantization="q4", progress=False)
    return gptj_tvm.load(folder)


@pytest.mark.parametrize("name", ["bfloat16", "q4"])
def test_steps_whose_rows_are_all_unfinished_prompts(name, generator, q4_generator):
    """Prompts in chunks of 8: the first steps hold no finished prompt, so lm_head runs on zero rows (the pair and
    VNNI kernels must then write nothing); every request still equals its solo run."""
    gen = q4_generator if name == "q4" else generator(name)
    prompts = random_prompts(gen, (30, 17, 3), seed=6)
    batched = gen.generate_batch(prompts, max_new_tokens=5, max_batch=2, prefill_chunk=8)
    for prompt, result in zip(prompts, batched):
        assert result.ids == gen.generate(prompt, max_new_tokens=5).ids
