"""The tuning database: one JSON file of MetaSchedule records, keyed by the hardware it was measured on.

    {"format": 1, "fingerprint": {...cpu, isa..., "target": {...}, "dtype": ...}, "prefill_buckets": [32, 128],
     "records": {task key: {"name": ..., "workload": ..., "record": ..., "latency_us": ..., "trials": ...}}}

Prefill's sequence length is dynamic, and MetaSchedule tunes static shapes: `tune` tunes prefill at a few
bucket lengths (the GEMMs of a static `prefill_B`), and an artifact compiled with the database gets a
`prefill_B` for each bucket, in whose chunks the runtime prefills long prompts.

Every write goes to a temporary file that is renamed over the old one, so the file is never half written and
a crashed or interrupted `tune` loses at most the task in flight. Compiling with a database made on other
hardware (another fingerprint) warns and uses the default schedules.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from gptj_tvm.core.errors import GptjError

FORMAT = 1


def workload_module(func):
    """A kernel as MetaSchedule keys it: alone in a module, as "main" (tuning adds the global symbol)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


class TuningDatabase:
    def __init__(self, path: Path, fingerprint: dict, records: dict | None = None, prefill_buckets=()):
        """fingerprint: what the records depend on (targets.resolve.tuning_fingerprint)."""
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records = records or {}
        self.prefill_buckets = sorted(set(prefill_buckets))

    @classmethod
    def open(cls, path, expected_fingerprint: dict, create: bool) -> "TuningDatabase":
        """The database at path; a new empty one if it does not exist and create is set."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise GptjError(f"{path}: no such tuning database")
            return cls(path, expected_fingerprint)
        try:
            raw = json.loads(path.read_text())
            assert raw["format"] == FORMAT and isinstance(raw["records"], dict)
            buckets = [int(b) for b in raw.get("prefill_buckets", [])]
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise GptjError(f"{path}: not a gptj-tvm tuning database") from None
        return cls(path, raw["fingerprint"], raw["records"], buckets)

    def matches(self, expected: dict) -> bool:
        return self.fingerprint == expected

    def save(self) -> None:
        text = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                           "prefill_buckets": self.prefill_buckets, "records": self.records})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add(self, task: str, name: str, record: ms.database.TuningRecord, trials: int, default_us: float) -> None:
        self.records[task] = {
            "name": name,
            "workload": record.workload.as_json(),
            "record": record.as_json(),
            "latency_us": 1e6 * sum(float(s) for s in record.run_secs) / max(len(record.run_secs), 1),
            "default_us": default_us,
            "trials": trials,
        }

    @staticmethod
    def beats_default(entry: dict) -> bool:
        return entry["latency_us"] < entry["default_us"]

    def to_memory_database(self) -> ms.database.MemoryDatabase:
        """The records that beat their kernel's default schedule (a small budget can find worse ones)."""
        db = ms.database.MemoryDatabase(module_equality="structural")
        for entry in self.records.values():
            if not self.beats_default(entry):
                continue
            workload = db.commit_workload(ms.database.Workload.from_json(entry["workload"]).mod)
            db.commit_tuning_record(ms.database.TuningRecord.from_json(entry["record"], workload))
        return db
