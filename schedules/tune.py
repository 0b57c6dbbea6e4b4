"""`gptj-tvm tune`: MetaSchedule, with its XGBoost cost model, searches schedules for the model's GEMMs.

Tasks are the distinct GEMM kernels of the decode function and of `prefill_B`, prefill at each bucket length
B (static shapes: MetaSchedule tunes those; the same kernel in 28 blocks is one task, so the cost does not
grow with depth). Trials are spread over tasks by how much time each takes per token: its default schedule's
time, measured alone, times its calls per decode step (or per prefill of B tokens, over B), a prompt's token
and a generated token counting the same. Each task is tuned in a scratch folder; its best record is then
added to the database file, which is rewritten whole and renamed into place, so an interrupted run loses at
most the task in flight and a second run with the same output resumes where the first stopped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tqdm import tqdm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.ir.utils import derived_object

from gptj_tvm.core.errors import GptjError
from gptj_tvm.core.interleaved import compare
from gptj_tvm.ir.pipeline import kernel_calls

from .database import TuningDatabase, workload_module
from .measure import kernel_timer, random_args, time_ms
from .default import TUNED, schedule_kernels

MIN_TRIALS = 2
TRIALS_PER_BATCH = 16


@dataclasses.dataclass
class Task:
    key: str  # structural hash of the kernel: the same GEMM in every block is one task
    name: str  # the kernel's name in the first function that calls it, e.g. "prefill_128/fused_matmul2_add"
    func: tvm.tirx.PrimFunc
    calls_per_token: float  # calls per decode step, plus calls per prefill_B over B
    default_ms: float = 0.0  # the default schedule's time, alone (measured by measure_defaults)

    @property
    def weight(self) -> float:
        return self.calls_per_token * self.default_ms

    def module(self) -> tvm.IRModule:
        return workload_module(self.func)


def task_key(func: tvm.tirx.PrimFunc) -> str:
    return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}"


def gemm_tasks(mod: tvm.IRModule, target: tvm.target.Target, buckets: tuple[int, ...] = ()) -> list[Task]:
    """The GEMM kernels (those the default rules schedule as matmuls) that one decode step and each
    `prefill_B` call, unmeasured, in call order."""
    from gptj_tvm.frontend.config import bucket_function

    _, report = schedule_kernels(mod, target)
    tasks: dict[str, Task] = {}
    for function, tokens in [("decode", 1), *((bucket_function(b), b) for b in buckets)]:
        for name, count in Counter(kernel_calls(mod, function)).items():
            if report.get(name) != "default CPUMatmul":
                continue
            func = mod[name]
            key = task_key(func)
            if key not in tasks:
                tasks[key] = Task(key, f"{function}/{name}", func, 0.0)
            tasks[key].calls_per_token += count / tokens
    return list(tasks.values())


def measure_defaults(tasks: list[Task], target: tvm.target.Target, known: dict,
                     progress: bool = True) -> list[Task]:
    """The tasks with their default schedule's time (from `known` {key: ms} where there), heaviest first."""
    for task in tqdm(tasks, desc="time default schedules", unit="task", disable=not progress, file=sys.stderr,
                     leave=False):
        task.default_ms = known[task.key] if task.key in known else default_ms(task, target)
    return sorted(tasks, key=lambda t: -t.weight)


def spread_trials(tasks: list[Task], trials_per_task: int) -> dict[str, int]:
    """trials_per_task x len(tasks) trials in all, each task's share by its time per token."""
    total = trials_per_task * len(tasks)
    weights = sum(t.weight for t in tasks) or 1.0
    return {t.key: max(MIN_TRIALS, round(total * t.weight / weights)) for t in tasks}


@derived_object
class _Progress(PyMeasureCallback):
    """The progress bar, and the deadline: once it has passed, the task ends after the batch just measured
    (MetaSchedule has added that batch's records to the task's database already)."""

    def __init__(self, bar: tqdm, deadline: float | None):
        self.bar, self.deadline = bar, deadline
        self.best = math.inf
        self.stopped = False
        self.trials = 0  # measured (a disabled bar counts nothing)
        self.started, self.first_batch_s = time.monotonic(), None  # the first includes the builder's start-up

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                self.best = min(self.best, sum(float(s) for s in result.run_secs) / len(result.run_secs))
        self.bar.update(len(runner_results))
        self.trials += len(runner_results)
        if self.first_batch_s is None:
            self.first_batch_s = time.monotonic() - self.started
        if self.best < math.inf:
            self.bar.set_postfix_str(f"best {1e3 * self.best:.3f} ms")
        if self.deadline is not None and time.monotonic() >= self.deadline and not self.stopped:
            self.stopped = True
            task_scheduler.terminate_task(task_id)


def _quiet_meta_schedule() -> None:
    # MetaSchedule logs every round (and XGBoost every iteration) to the console; the progress bar says enough
    import logging

    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        # tune_tir's logging setup names its logger's handlers in a dictConfig and fails on one without a name
        # (pytest's capture handler was found there after the server tests, in the same process)
        for handler in [h for h in logger.handlers if h.get_name() is None]:
            logger.removeHandler(handler)


def tune_task(task: Task, target: tvm.target.Target, trials: int, bar: tqdm, seed: int = 0,
              deadline: float | None = None):
    """The best TuningRecord MetaSchedule finds for the task in `trials` trials, or in those measured by the
    `deadline` (time.monotonic()), None if none ran; the trials measured; the seconds its first batch took."""
    _quiet_meta_schedule()
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _Progress(bar, deadline)]
    with tempfile.TemporaryDirectory(prefix="gptj-tune-") as work:
        database = ms.tune_tir(
            # batches of at most TRIALS_PER_BATCH: the deadline is checked between them
            task.module(), target, work, max_trials_global=trials, num_trials_per_iter=min(trials, TRIALS_PER_BATCH),
            # a fresh builder worker spends 15-30 s importing TVM's tensor intrinsics on 2 cores before its
            # first build; a long timeout lets it (an initializer doing the import costs that twice per task)
            builder=ms.builder.LocalBuilder(timeout_sec=120),
            # measured as measure.time_ms measures: weights flushed from the caches before every call
            runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
                number=1, repeat=5, min_repeat_ms=0, enable_cpu_cache_flush=True)),
            measure_callbacks=callbacks, num_tuning_cores=int(target.attrs.get("num-cores", 1)), seed=seed,
            strategy=ms.search_strategy.EvolutionarySearch(
                # the default 512 candidates per round cost minutes on 2 cores for a budget of a few trials
                population_size=min(512, 32 * trials), init_min_unmeasured=min(50, 8 * trials)))
        records = [r for r in database.get_all_tuning_records() if r.run_secs]
    progress = callbacks[-1]
    return min(records, key=_mean_seconds, default=None), progress.trials, progress.first_batch_s


def _mean_seconds(record) -> float:
    return sum(float(s) for s in record.run_secs) / len(record.run_secs)


def default_ms(task: Task, target: tvm.target.Target, repeat: int = 5) -> float:
    """The task's time with its default schedule, measured like the tuned one (alone, random inputs)."""
    scheduled, _ = schedule_kernels(task.module(), target)
    return time_ms(scheduled["main"], target, random_args(task.func, np.random.default_rng(0)), repeat)


def tune(mod: tvm.IRModule, target: tvm.target.Target, expected: dict, out: Path, trials: int = 64,
         deadline: float | None = None, progress: bool = True, prefill_buckets: tuple[int, ...] = ()) -> dict:
    """Tune the GEMMs of decode and of each `prefill_B` of an optimized module (ir.pipeline.optimize, exported
    with those buckets) into the database at out, whose records are valid for the `expected` fingerprint. By the
    `deadline` (time.monotonic()), if given, the task in flight stops after its current batch of trials and
    keeps its best so far, the tasks after it are left, and so is the closing comparison."""
    db = TuningDatabase.open(out, expected, create=True)
    if not db.matches(expected):
        raise GptjError(f"{out}: tuned on other hardware or for another target/dtype; choose another output")
    db.prefill_buckets = sorted(set(db.prefill_buckets) | set(prefill_buckets))
    db.save()  # the output exists from the start, even if no task finishes
    known = {key: entry["default_us"] / 1e3 for key, entry in db.records.items()}
    tasks = measure_defaults(gemm_tasks(mod, target, prefill_buckets), target, known, progress)
    budget = spread_trials(tasks, trials)
    start = time.perf_counter()
    summary = {"tasks": len(tasks), "resumed": 0, "tuned": 0, "skipped_for_time": 0}
    first_batch_s = None
    for i, task in enumerate(tasks):
        if task.key in db.records:
            summary["resumed"] += 1
            continue
        # a task runs at least one batch: none starts that the last one's first batch says cannot end in time
        if deadline is not None and time.monotonic() + (first_batch_s or 0.0) >= deadline:
            summary["skipped_for_time"] += 1
            continue
        n = budget[task.key]
        with tqdm(total=n, desc=f"task {i + 1}/{len(tasks)} {task.name}", unit="trial", disable=not progress,
                  file=sys.stderr) as bar:
            record, measured, first_batch_s = tune_task(task, target, n, bar, deadline=deadline)
        if record is not None:
            db.add(task.key, task.name, record, measured, default_us=1e3 * task.default_ms)
            db.save()
            summary["tuned"] += 1
    summary["seconds"] = time.perf_counter() - start
    out_of_time = deadline is not None and time.monotonic() >= deadline
    summary["tuned_vs_default"] = None if out_of_time else compare_with_defaults(tasks, db, target,
                                                                                 progress=progress)
    return summary


def compare_with_defaults(tasks: list[Task], db: TuningDatabase, target: tvm.target.Target, rounds: int = 5,
                          progress: bool = True) -> dict:
    """What the database changes, per token: for decode and each prefill_B, the time of the GEMMs it schedules
    (calls per token x ms), tuned against default, the two builds of every kernel timed back to back round by
    round (gptj_tvm.core.interleaved). Only records that beat their default count, as in `compile --tuning-db`."""
    memory_db = db.to_memory_database()
    pairs = []
    rng = np.random.default_rng(0)
    for task in tasks:
        tuned, report = schedule_kernels(task.module(), target, memory_db)
        if report.get("main") != TUNED:
            continue
        default, _ = schedule_kernels(task.module(), target)
        pairs.append((task, kernel_timer(default["main"], target, repeat=3),
                      kernel_timer(tuned["main"], target, repeat=3), random_args(task.func, rng)))
    result = {}
    for phase in dict.fromkeys(task.name.split("/")[0] for task, *_ in pairs):  # decode, prefill_B, ...
        chosen = [p for p in pairs if p[0].name.split("/")[0] == phase]
        defaults, tuned_times = [], []
        for r in tqdm(range(rounds), desc=f"tuned vs default ({phase})", disable=not progress, file=sys.stderr,
                      leave=False):
            per_token = {"default": 0.0, "tuned": 0.0}
            for task, default_timer, tuned_timer, args in chosen:
                order = (("default", default_timer), ("tuned", tuned_timer))
                for which, timer in (order if r % 2 == 0 else order[::-1]):
                    per_token[which] += task.calls_per_token * timer(args)
            defaults.append(per_token["default"])
            tuned_times.append(per_token["tuned"])
        result[phase] = {"kernels": len(chosen), **compare(defaults, tuned_times)}
    return result
