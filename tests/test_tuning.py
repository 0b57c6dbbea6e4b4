"""MetaSchedule tuning on the tiny model with a tiny trial budget: the database, resume, compile with it."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import gptj_tvm
from gptj_tvm.cli import main
from gptj_tvm.runtime.artifact import ArtifactMetadata


BUCKET = 8


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, checkpoint):
    """A database tuned in two runs: the first tunes decode's GEMMs, the second adds prefill's at one bucket
    length and keeps (resumes past) those the first tuned, as it does after an interrupted run."""
    db = tmp_path_factory.mktemp("tuning") / "tiny.json"
    model = checkpoint("tiny")
    args = ["tune", str(model), "-o", str(db), "--trials", "1", "--quiet", "--prefill-buckets"]
    assert main(args + ["none"]) == 0
    first = json.loads(db.read_text())
    assert main(args + [str(BUCKET)]) == 0
    second = json.loads(db.read_text())
    return {"db": db, "first": first, "second": second}


def test_tune_writes_a_database_keyed_by_this_hardware(tuned):
    first = tuned["first"]
    assert first["format"] == 1 and first["prefill_buckets"] == [] and tuned["second"]["prefill_buckets"] == [BUCKET]
    assert first["fingerprint"]["target"]["kind"] == "llvm" and first["fingerprint"]["dtype"] == "float32"
    assert first["fingerprint"]["isa"]  # the CPU's ISA extensions are part of the key
    for record in first["records"].values():
        assert record["latency_us"] > 0 and record["default_us"] > 0 and record["trials"] >= 2


def test_a_second_run_resumes(tuned):
    first, second = tuned["first"]["records"], tuned["second"]["records"]
    assert len(first) == 3 and len(second) == 5
    assert all(second[key] == value for key, value in first.items())  # the first run's tasks kept, not redone


def test_tune_covers_decode_and_each_prefill_bucket(tuned):
    names = [r["name"] for r in tuned["second"]["records"].values()]
    decode = [n for n in names if n.startswith("decode/")]
    bucket = [n for n in names if n.startswith(f"prefill_{BUCKET}/")]
    # decode: the block's two GEMVs and lm_head; prefill_8: the block's two GEMMs at 8 rows (its lm_head
    # runs on the last position only: decode's lm_head kernel, one task)
    assert len(decode) == 3 and len(bucket) == 2 and len(names) == 5


def test_max_seconds_bounds_the_whole_run(checkpoint, tmp_path, capsys):
    """--max-seconds counts from the start; a task past it stops after the batch it is measuring, keeping its
    best so far (it used to be checked between tasks only: 1,136 s for --max-seconds 240)."""
    import logging
    import time

    from tqdm import tqdm

    from gptj_tvm.compiler.build import export_model, prepare, variant_for
    from gptj_tvm.compiler.options import TuneOptions
    from gptj_tvm.ir import pipeline
    from gptj_tvm.schedules.tune import TRIALS_PER_BATCH, gemm_tasks, tune_task

    db = tmp_path / "late.json"
    assert main(["tune", str(checkpoint("tiny")), "-o", str(db), "--trials", "8", "--max-seconds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"0 tasks tuned, 0 already there, (\d+) left for lack of time, of \1 ", out), out
    assert "not measured (--max-seconds had passed)" in out and json.loads(db.read_text())["records"] == {}

    _, config, dtype, target = prepare(checkpoint("tiny"), TuneOptions())
    mod = pipeline.optimize(export_model(config, dtype, variant=variant_for(target, dtype, tuned=True))[0], target)
    task = min(gemm_tasks(mod, target), key=lambda t: t.calls_per_token)
    # an unnamed handler on MetaSchedule's logger (as pytest's capture handler after the server tests) used to
    # stop tune_tir's logging setup
    logging.getLogger("tvm.s_tir.meta_schedule").addHandler(logging.NullHandler())
    with tqdm(total=3 * TRIALS_PER_BATCH, disable=True) as bar:
        record, measured, _ = tune_task(task, target, 3 * TRIALS_PER_BATCH, bar, deadline=time.monotonic())
    assert measured == TRIALS_PER_BATCH and record is not None and record.run_secs  # one batch, and its best


def test_compile_uses_only_records_that_beat_the_default(tuned, checkpoint, tmp_path, capsys):
    winners = sum(r["latency_us"] < r["default_us"] for r in tuned["second"]["records"].values())
    out = tmp_path / "artifact"
    assert main(["compile", str(checkpoint("tiny")), "-o", str(out), "--tuning-db", str(tuned["db"])]) == 0
    assert f"schedules: {winners} kernels tuned" in capsys.readouterr().out


def all_winners(tuned, tmp_path):
    """The database with every record declared faster than its default (two trials may find nothing faster
    than the default), so that compile runs them all."""
    raw = json.loads(tuned["db"].read_text())
    for record in raw["records"].values():
        record["default_us"] = record["latency_us"] * 2
    db = tmp_path / "all-winners.json"
    db.write_text(json.dumps(raw))
    return db


def test_tune_says_what_the_database_changes(tuned, checkpoint, tmp_path, capsys):
    db = all_winners(tuned, tmp_path)  # every record counts as a winner, as compile --tuning-db then takes it
    args = ["tune", str(checkpoint("tiny")), "-o", str(db), "--trials", "1", "--prefill-buckets", str(BUCKET),
            "--quiet"]
    assert main(args) == 0  # nothing left to tune: the database's kernels against their defaults, interleaved
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("what it changes, interleaved: decode GEMMs (3 kernels) ")
    assert f"prefill_{BUCKET} GEMMs (2 kernels)" in line


def test_compile_with_the_database_gives_the_same_logits(tuned, artifact, checkpoint, tmp_path, capsys):
    db = all_winners(tuned, tmp_path)
    out = tmp_path / "tuned-artifact"
    assert main(["compile", str(checkpoint("tiny")), "-o", str(out), "--tuning-db", str(db)]) == 0
    assert "kernels tuned" in capsys.readouterr().out
    ids = [464, 10730, 29598, 11, 290, 262, 2068]
    expected = gptj_tvm.load(artifact("tiny")).logits(ids)
    actual = gptj_tvm.load(out).logits(ids)
    assert np.max(np.abs(actual - expected)) / np.max(np.abs(expected)) < 1e-5
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(k["schedule"] == "tuned" for k in report["kernels"].values() if k["decode_calls"]) == 3
    assert report["prefill_buckets"] == [BUCKET, 32, 128]  # the database's, and compile's defaults
    meta = ArtifactMetadata.read(out)
    bucket_gemms = {k for k in meta.kernel_calls[f"prefill_{BUCKET}"] if "matmul" in k}
    assert all(report["kernels"][k]["prefill_bucket_calls"] for k in bucket_gemms)
    assert len(bucket_gemms) == 3 and {report["kernels"][k]["schedule"] for k in bucket_gemms} == {"tuned"}


def test_prefill_in_bucket_chunks_matches_the_reference(tuned, reference, checkpoint, tmp_path):
    db = all_winners(tuned, tmp_path)
    out = tmp_path / "bucketed"
    assert main(["compile", str(checkpoint("tiny")), "-o", str(out), "--tuning-db", str(db), "--quiet",
                 "--prefill-buckets", "none"]) == 0
    gen = gptj_tvm.load(out)
    assert gen.meta.prefill_buckets == {str(BUCKET): f"prefill_{BUCKET}"}
    ids = [int(i) for i in np.random.default_rng(3).integers(0, gen.vocab_size, 2 * BUCKET + 3)]
    expected = reference("tiny").logits(ids)
    for n in (BUCKET, 2 * BUCKET, 2 * BUCKET + 3, 3):  # one chunk; two; two and 3 left; none
        pieces = gen._prefill_pieces(n)
        assert sum(p for _, p in pieces) == n and [f for f, _ in pieces].count(f"prefill_{BUCKET}") == n // BUCKET
        logits, _ = gen.forward("prefill", ids[:n], gen.new_cache(n), n)
        assert np.max(np.abs(logits[-1] - expected[n - 1])) / np.max(np.abs(expected[n - 1])) < 1e-4
    # a chunked prompt after a past: the cache holds what the pieces wrote
    cache = gen.new_cache(2 * BUCKET + 3)
    _, cache = gen.forward("prefill", ids[:3], cache, 3)
    logits, _ = gen.forward("prefill", ids[3:], cache, 2 * BUCKET + 3)
    assert np.max(np.abs(logits[-1] - expected[-1])) / np.max(np.abs(expected[-1])) < 1e-4


def test_database_from_other_hardware_is_ignored_with_a_warning(tuned, checkpoint, tmp_path, capsys):
    other = tmp_path / "other.json"
    shutil.copyfile(tuned["db"], other)
    raw = json.loads(other.read_text())
    raw["fingerprint"]["cpu"] = "AMD EPYC 9R14 96-Core Processor"
    raw["fingerprint"]["isa"] = ["avx2", "avx512f", "avx512_bf16"]
    other.write_text(json.dumps(raw))
    out = tmp_path / "artifact"
    assert main(["compile", str(checkpoint("tiny")), "-o", str(out), "--tuning-db", str(other), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: ignoring tuning database" in err and "cpu" in err
    meta = ArtifactMetadata.read(out)
    assert "tuned" not in meta.kernels.values() and meta.tuning_db is None


def test_tune_refuses_to_mix_hardware_in_one_database(tuned, checkpoint, tmp_path, capsys):
    other = tmp_path / "other.json"
    raw = json.loads(tuned["db"].read_text())
    raw["fingerprint"]["cpu"] = "another CPU"
    other.write_text(json.dumps(raw))
    code = main(["tune", str(checkpoint("tiny")), "-o", str(other), "--trials", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "other hardware" in err and len(err.strip().splitlines()) == 1


def test_missing_tuning_database_is_one_line(checkpoint, tmp_path, capsys):
    code = main(["compile", str(checkpoint("tiny")), "-o", str(tmp_path / "a"), "--tuning-db",
                 str(tmp_path / "none.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "no such tuning database" in err and len(err.strip().splitlines()) == 1
