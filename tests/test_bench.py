"""bench's bound from the bytes a decode step reads, `bench A B` (interleaved rounds), and tune's closing
comparison of the tuned kernels against their defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import gptj_tvm
from conftest import CONFIGS
from gptj_tvm.cli import main
from gptj_tvm.core.errors import GptjError
from gptj_tvm.core.interleaved import compare
from gptj_tvm.runtime import ab
from gptj_tvm.runtime.bench import cache_at, profile_decode
from gptj_tvm.runtime.artifact import ArtifactMetadata

ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4}


def header_sizes(folder) -> dict[str, tuple[int, int]]:
    """{weight name: (bytes, rows)} from the artifact's safetensors headers."""
    meta = ArtifactMetadata.read(folder)
    sizes = {}
    for file in meta.weight_files:
        with safe_open(str(folder / file), framework="np") as f:
            for key in f.keys():
                info = f.get_slice(key)
                shape = info.get_shape()
                sizes[key] = (int(np.prod(shape)) * ITEM_BYTES[info.get_dtype()], shape[0])
    return sizes


def test_decode_reads_are_the_tensors_each_kernel_takes(artifact):
    folder = artifact("tiny")
    config = CONFIGS["tiny"]
    gen = gptj_tvm.load(folder)
    context = 100
    rows = {row["name"]: row for row in profile_decode(gen, cache_at(gen, context), 5, context)}
    sizes = header_sizes(folder)
    row_of = {name: sizes[name][0] // sizes[name][1] for name in ("wte", "rotary.cos", "rotary.sin")}
    kv_row = config.n_head * config.head_dim * 4  # float32 keys or values of one position
    layer_norms = sum(b for k, (b, _) in sizes.items() if ".ln_" in k or k.startswith("ln_f."))
    linears = sum(b for k, (b, _) in sizes.items() if ".w_in." in k or ".w_out." in k or k.startswith("lm_head."))
    assert rows["take"]["read_bytes"] == row_of["wte"]  # one row of the embedding, not 50400
    assert rows["layer_norm"]["read_bytes"] == layer_norms
    assert rows["attention"]["read_bytes"] == 2 * config.n_layer * context * kv_row  # keys and values to the context
    # rotary_append writes the new position; it reads the angles of that position only
    assert rows["rotary_append"]["read_bytes"] == config.n_layer * (row_of["rotary.cos"] + row_of["rotary.sin"])
    assert sum(r["read_bytes"] for n, r in rows.items() if n.startswith("fused_matmul")) == linears
    every_weight_once = sum(b for b, _ in sizes.values()) - sum(sizes[n][0] for n in row_of)
    total = (every_weight_once + row_of["wte"] + config.n_layer * (row_of["rotary.cos"] + row_of["rotary.sin"])
             + 2 * config.n_layer * context * kv_row)
    assert sum(r["read_bytes"] for r in rows.values()) == total
    assert all(r["read_bytes"] == 0 for n, r in rows.items() if n.startswith("vm.builtin."))


def test_compare_calls_only_a_difference_every_round_agrees_on():
    same = compare([1.0, 2.0, 4.0], [1.1, 1.8, 4.0])
    assert same["ratio"] == pytest.approx([1.1, 0.9, 1.0]) and not same["called"]
    assert same["ratio_range"] == pytest.approx([0.9, 1.1]) and same["ratio_median"] == pytest.approx(1.0)
    faster = compare([10.0, 12.0, 11.0], [8.0, 9.0, 9.9])
    assert faster["called"] and faster["ratio_median"] == pytest.approx(0.8) and "less" in faster["verdict"]
    assert faster["a_median"] == 11.0 and faster["b_range"] == [8.0, 9.9]


def test_ab_of_an_artifact_against_itself_cannot_be_called(artifact):
    result = ab.run_ab(artifact("tiny"), artifact("tiny"), rounds=15, bandwidth=False, progress=False)
    low, high = result["decode_ms"]["ratio_range"]
    assert low <= 1.0 <= high and not result["decode_ms"]["called"], result["decode_ms"]["ratio"]
    assert result["mode"] == "one process" and len(result["decode_ms"]["ratio"]) == 15


def test_ab_tells_a_slower_build_apart(artifact):
    """The GPU graph compiled for the CPU (thread-block attention, dlight's GPU-shaped GEMVs) is the same model,
    about 6x slower here in decode: every round must say so. One thread each (a child process): two threads
    spin at every kernel's barrier, and a machine whose other core is busy then makes any artifact's times
    jump by 10x."""
    done = subprocess.run([sys.executable, "-m", "gptj_tvm.cli", "bench", str(artifact("wide")),
                           str(artifact("wide", variant="gpu-on-cpu")), "--rounds", "3", "--no-bandwidth", "--json"],
                          capture_output=True, text=True, env={**os.environ, "TVM_NUM_THREADS": "1"}, check=True)
    decode = json.loads(done.stdout)["decode_ms"]
    assert decode["called"] and decode["ratio_range"][0] > 1.0, decode


def test_ab_alternates_processes_where_both_do_not_fit(artifact, monkeypatch, capsys):
    monkeypatch.setattr(ab, "MEMORY_MARGIN", 1e9)  # pretend memory holds one artifact at a time
    assert main(["bench", str(artifact("tiny")), str(artifact("tiny")), "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"].startswith("a process per artifact") and len(result["decode_ms"]["ratio"]) == 2
    assert all(b is not None and b > 0 for b in result["read_bandwidth_gb_s"])
    assert all(x > 0 for x in result["a_x_bound"] + result["b_x_bound"])


def test_ab_refuses_two_different_models(artifact):
    with pytest.raises(GptjError, match="different models"):
        ab.run_ab(artifact("tiny"), artifact("odd"), rounds=2, bandwidth=False, progress=False)
