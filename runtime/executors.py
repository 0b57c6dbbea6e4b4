"""Running a step plan (runtime/scheduler.py) on a loaded model: its rows in, float32 logits of the sampled
rows out.

Two ways, by what the artifact exports:
- `SlotExecutor`: the batched `step` over slot KV caches ([slots, positions, n_head, head_dim] per layer, keys
  and values), every row of the plan in one call, so each weight is read once for all the sequences (CPU and
  CUDA artifacts).
- `SequenceExecutor`: `prefill` and `decode` over a KV cache per sequence, sized to what it will hold; a batch
  of one. Vulkan artifacts (no `step`) run this way, and so does `Generator.generate`: one sequence needs no
  slot table, and its cache is no larger than its tokens.
"""

from __future__ import annotations

import numpy as np
import psutil
import tvm
import tvm.runtime

from gptj_tvm.core.errors import GptjError

from .scheduler import Request, StepPlan


class SlotExecutor:
    copies_rows = True  # sequences share the slot caches: one slot's rows can seed another's (the prefix cache)

    def __init__(self, model, max_batch: int, positions: int | None = None, reserve: bool = False):
        """positions per sequence (a slot's length): the model's context by default; reserve: the caches' memory
        is written once now (_commit), not at first use."""
        if "step" not in model.meta.functions:
            raise GptjError(f"{model.folder}: has no batched step function (compile it again with this "
                            "version of gptj-tvm; CPU and CUDA artifacts have one)")
        self.model, self.max_batch = model, max_batch
        self.positions = min(positions or model.context, model.context)
        self.max_prompt_tokens = self.positions - 1
        reserve = reserve and model.meta.device == "cpu"
        if reserve:
            self._check_memory()
        self._caches = model.new_slot_caches(max_batch, self.positions)
        if reserve:
            for cache in self._caches:
                _commit(cache)

    def _check_memory(self) -> None:
        needed = self.max_batch * self.positions * self.model.meta.kv_bytes_per_position
        available = psutil.virtual_memory().available
        if needed > available:
            raise GptjError(f"a KV cache of {self.max_batch} slots x {self.positions} positions takes "
                            f"{needed / 1e9:.3g} GB and {available / 1e9:.3g} GB is free: lower --max-batch or "
                            "set --kv-cache-gb")

    def execute(self, plan: StepPlan) -> np.ndarray:
        for source, target, rows in plan.copies:
            self._copy_rows(source, target, rows)
        device = self.model.device

        def tensor(values, shape=(-1,)):
            return tvm.runtime.tensor(np.asarray(values, dtype=np.int32).reshape(shape), device)

        logits = self.model.run_step(tensor(plan.ids, (1, -1)), tensor(plan.slots), tensor(plan.positions),
                                     tensor(plan.logit_rows), self._caches)
        return logits.numpy()[0, :, :self.model.vocab_size]

    def release(self, request: Request) -> None:
        """A slot needs no clearing: positions past a sequence's length are never read."""

    def _copy_rows(self, source: int, target: int, rows: int) -> None:
        """Positions [0, rows) of slot `source` into slot `target`, every layer's keys and values."""
        for cache in self._caches:
            _, positions, *row = (int(d) for d in cache.shape)
            row_bytes = int(np.prod(row)) * _itemsize(str(cache.dtype))
            view = [cache._create_view((rows, *row), relative_byte_offset=slot * positions * row_bytes)
                    for slot in (source, target)]
            view[1].copyfrom(view[0])


class SequenceExecutor:
    max_batch = 1
    copies_rows = False

    def __init__(self, model, positions: int | None = None):
        self.model = model
        self.positions = self.max_prompt_tokens = min(positions or model.context, model.context)
        self._caches: dict[int, object] = {}  # request id -> its KV cache

    def execute(self, plan: StepPlan) -> np.ndarray:
        (chunk,) = plan.chunks  # the scheduler runs one sequence at a time here
        request = chunk.request
        cache = self._caches.get(request.id)
        if cache is None:
            cache = self.model.new_cache(min(len(request.prompt_ids) + request.params.max_tokens, self.positions))
        total = chunk.start + len(chunk.tokens)
        logits, self._caches[request.id] = self.model.forward("prefill" if chunk.prompt else "decode", chunk.tokens,
                                                              cache, total)
        return logits[-1:] if chunk.sampled else logits[:0]

    def release(self, request: Request) -> None:
        self._caches.pop(request.id, None)


def _commit(tensor) -> None:
    """Writes zeros over the tensor, so that its pages are the process's from now on rather than from the first
    write of each (as llama.cpp clears its KV buffer at start): on the VMs here a first touch cost 0.7-3 s per
    GB, paid inside the request that first reached a slot's rows; and a cache too large for the machine shows
    at start."""
    zeros = np.zeros(tuple(int(d) for d in tensor.shape), np.dtype(f"u{tensor.dtype.itemsize}"))  # calloc'd
    tensor._create_view(zeros.shape, zeros.dtype.name).copyfrom(zeros)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def executor_for(model, max_batch: int, positions: int | None = None, reserve: bool = False):
    """The batched step where the artifact has one, else one sequence at a time (Vulkan)."""
    if "step" in model.meta.functions:
        return SlotExecutor(model, max_batch, positions, reserve)
    return SequenceExecutor(model, positions)
