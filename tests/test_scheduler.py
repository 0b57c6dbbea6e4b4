"""The engine's policy (runtime/scheduler.py), with no model: which requests run, which rows each step holds,
which rows' logits are sampled. Expected plans are written out by hand."""

from __future__ import annotations

import pytest

from gptj_tvm.core.errors import GptjError
from gptj_tvm.runtime.scheduler import QueueFull, Request, SamplingParams, Scheduler


def request(n: int, first: int = 0) -> Request:
    return Request(list(range(first, first + n)), SamplingParams(max_tokens=4), lambda event: None)


def sample(plan, token: int = 99) -> None:
    """What the engine's update does for the plan's sampled requests: one new token each."""
    for r in plan.sampled:
        r.tokens.append(token)


def test_first_come_first_served_into_free_slots():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=None)
    a, b, c = s.add(request(3)), s.add(request(2, 10)), s.add(request(1, 20))
    plan = s.schedule()
    assert plan.requests == [a, b] and list(s.waiting) == [c]
    assert {a.slot, b.slot} == {0, 1}
    assert plan.ids == [0, 1, 2, 10, 11] and plan.positions == [0, 1, 2, 0, 1]
    assert plan.slots == [a.slot] * 3 + [b.slot] * 2
    assert plan.logit_rows == [2, 4] and plan.sampled == [a, b]


def test_prompts_are_chunked_within_the_budget_and_decode_rows_come_first():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=8)
    long, short = s.add(request(20)), s.add(request(5, 100))
    plans = []
    for _ in range(4):
        plan = s.schedule()
        plans.append([(c.request, c.start, len(c.tokens), c.prompt, c.sampled) for c in plan.chunks])
        s.advance(plan)
        sample(plan)
    assert plans[0] == [(long, 0, 8, True, False)]  # the budget is spent on the oldest prompt
    assert plans[1] == [(long, 8, 8, True, False)]
    assert plans[2] == [(long, 16, 4, True, True), (short, 0, 4, True, False)]
    # long decodes its first token at position 20 (first row); short's last prompt token comes after it
    assert plans[3] == [(long, 20, 1, False, True), (short, 4, 1, True, True)]
    plan = s.schedule()
    assert plan.positions == [21, 5] and plan.logit_rows == [0, 1]


def test_a_cancelled_request_leaves_at_the_boundary_and_its_slot_goes_to_the_next():
    s = Scheduler(max_batch=1, max_queue=1, prefill_chunk=None)
    first, second = s.add(request(4)), s.add(request(4, 50))
    with pytest.raises(QueueFull, match="waiting"):
        s.add(request(1))
    s.advance(s.schedule())
    first.cancel()
    plan = s.schedule()
    assert plan.cancelled == [first] and first.finish_reason == "cancelled"
    assert plan.requests == [second] and second.slot == first.slot
    assert s.stats()["running"] == 1 and s.stats()["waiting"] == 0


def test_a_queued_request_cancelled_before_it_runs_never_takes_a_slot():
    s = Scheduler(max_batch=1, max_queue=2, prefill_chunk=None)
    running, queued = s.add(request(2)), s.add(request(2))
    s.schedule()
    queued.cancel()
    plan = s.schedule()
    assert plan.cancelled == [queued] and queued.slot is None and list(s.waiting) == []
    assert plan.requests == [running]


def test_finish_frees_the_slot_and_stats_count_positions():
    s = Scheduler(max_batch=2, max_queue=0, prefill_chunk=None)
    a, b = s.add(request(3)), s.add(request(6))
    plan = s.schedule()
    s.advance(plan)
    sample(plan)
    assert s.stats() == {"running": 2, "waiting": 0, "slots": 2, "slots_used": 2, "kv_tokens_used": 4 + 7,
                         "prefix_cache_queries": 0, "prefix_cache_hits": 0}
    s.finish(a, "length")
    assert a.finish_reason == "length" and s.free == [a.slot] and s.schedule().requests == [b]


def test_bad_limits_are_refused():
    with pytest.raises(GptjError, match="at least"):
        Scheduler(max_batch=0, max_queue=1, prefill_chunk=8)
    with pytest.raises(GptjError, match="at least"):
        Scheduler(max_batch=1, max_queue=1, prefill_chunk=0)


def test_users_arriving_together_wait_for_the_first_to_prefill_their_shared_prefix():
    """b shares a's first 40 prompt tokens: rather than prefill them too (sharing a's budget), b waits until a
    has computed them, then starts from a copy of a's rows."""
    s = Scheduler(max_batch=3, max_queue=4, prefill_chunk=8, prefix_cache=True)
    system = list(range(100, 140))
    a = s.add(Request(system + [1, 2], SamplingParams(), lambda event: None))
    first = s.schedule()
    s.advance(first)
    b = s.add(Request(system + [3, 4, 5], SamplingParams(), lambda event: None))
    admitted_at = None
    for _ in range(6):
        plan = s.schedule()
        if b.slot is not None and admitted_at is None:
            admitted_at = plan
        s.advance(plan)
        sample(plan)
    assert admitted_at.copies == [(a.slot, b.slot, 40)] and b.cached_tokens == 40
    # a's last two prompt tokens, then b's last three in the rest of the step's budget
    assert [(c.request, c.start, len(c.tokens)) for c in admitted_at.chunks] == [(a, 40, 2), (b, 40, 3)]
