"""A server's KV cache takes its memory at start (`engine(reserve_memory=True)`), not in the requests that first
write each slot's rows."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import tvm

from gptj_tvm.core.errors import GptjError
from gptj_tvm.runtime.engine import SamplingParams, TokenEvent
from gptj_tvm.runtime.executors import _commit

MB = 1 << 20


def test_commit_makes_a_tensor_resident_and_zero():
    process = psutil.Process()
    tensor = tvm.runtime.empty((96, 1024, 1024), "bfloat16", tvm.cpu())  # 192 MB, its pages not yet touched
    before = process.memory_info().rss
    _commit(tensor)
    assert process.memory_info().rss - before >= 0.9 * 192 * MB
    assert not tensor.numpy().astype(np.float32).any()


def test_an_engine_with_reserved_memory_generates_the_reference_tokens(generator, reference):
    gen = generator("tiny")
    engine = gen.engine(max_batch=3, prefill_chunk=8, reserve_memory=True)
    prompt = [int(i) for i in np.random.default_rng(2).integers(0, gen.vocab_size, 11)]
    out = []
    engine.submit(prompt, SamplingParams(max_tokens=6, ignore_eos=True),
                  lambda e: out.append(e.token) if isinstance(e, TokenEvent) else None)
    engine.run_until_idle()
    assert out == reference("tiny").greedy(prompt, 6)


def test_a_kv_cache_past_the_free_memory_is_one_clear_error(generator, monkeypatch):
    gen = generator("tiny")
    free = gen.meta.kv_bytes_per_position * 8 * gen.context // 2  # half of 8 full slots
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": free})())
    with pytest.raises(GptjError, match=r"8 slots x 128 positions .* lower --max-batch or set --kv-cache-gb"):
        gen.engine(max_batch=8, reserve_memory=True)
    gen.engine(max_batch=3, reserve_memory=True)  # 3 of them fit
