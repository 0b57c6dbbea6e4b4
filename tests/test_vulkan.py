"""`--target vulkan` artifacts on a Vulkan driver (Mesa's lavapipe, on this CPU, in CI): the same numbers as the
llvm artifact, the launch protocol's corners, and one clear line for what is missing.

The numpy GPT-J comparisons (every position, decode step by step, greedy) run in test_model.py with variant
"vulkan"; these compare against the CPU artifact, as a user switching targets would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from conftest import require_vulkan
from gptj_tvm.runtime import vulkan
from gptj_tvm.runtime.inspect import inspect_artifact
from gptj_tvm.targets.vulkan import vulkan_target
from reference import rel_max_error
from test_cli import assert_one_line_error, run
from test_model import prompt_for


@pytest.mark.parametrize("name", ["tiny", "wide"])
def test_logits_and_greedy_tokens_match_the_llvm_artifact(name, generator):
    on_vulkan, on_cpu = generator(name, variant="vulkan"), generator(name)
    ids = prompt_for(on_cpu)
    assert rel_max_error(on_vulkan.logits(ids), on_cpu.logits(ids)) < 1e-4
    expected = on_cpu.generate(ids[:6], max_new_tokens=12, temperature=0)
    actual = on_vulkan.generate(ids[:6], max_new_tokens=12, temperature=0)
    assert actual.ids == expected.ids


def test_the_engine_runs_vulkan_one_sequence_at_a_time(generator):
    """No batched step: generate_batch (and so the server's engine) runs the prompts one after another on the
    sequence functions, each what the llvm artifact's batched engine gives it."""
    on_vulkan, on_cpu = generator("tiny", variant="vulkan"), generator("tiny")
    prompts = [prompt_for(on_cpu)[:n] for n in (3, 7, 5)]
    engine = on_vulkan.engine(max_batch=4)
    assert engine.executor.max_batch == 1 and "step" not in on_vulkan.meta.functions
    options = {"max_new_tokens": 6, "temperature": 0.0}
    expected = on_cpu.generate_batch(prompts, max_batch=3, **options)
    actual = on_vulkan.generate_batch(prompts, max_batch=3, **options)
    assert [r.ids for r in actual] == [r.ids for r in expected]
    assert [r.finish_reason for r in actual] == ["length"] * 3


def test_vulkan_artifact_runs_five_kernels_per_fused_block(artifact, generator):
    generator("tiny", variant="vulkan")  # the process's Vulkan device is open
    report = inspect_artifact(artifact("tiny", variant="vulkan"), run=True)
    assert report["device"] == "vulkan" and report["kernels_counted_from"].startswith("a run")
    assert report["decode_kernels_per_block"] == 5


def test_grid_wider_than_65535_is_folded_and_its_padding_skipped(tmp_path, generator):
    """70001 blocks: wgpu dispatches 35001 x 1 x 2 and the one padding block must write nothing (TVM's WGSL
    guard lets it through; runtime/vulkan.py tightens it)."""
    generator("tiny", variant="vulkan")
    n = 70001

    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((n + 1,), "float32"), out: T.Buffer((n + 1,), "float32")):
        for b in T.thread_binding(n, thread="blockIdx.x"):
            for t in T.thread_binding(1, thread="threadIdx.x"):
                with T.sblock("add"):
                    i = T.axis.spatial(n, b + t)
                    out[i] = a[i] + T.float32(1)

    tvm.compile(tvm.IRModule({"add_one": add_one}), target=vulkan_target()).export_library(str(tmp_path / "k.so"))
    kernel = tvm.runtime.load_module(str(tmp_path / "k.so"))["add_one"]
    device = tvm.runtime.device("webgpu", 0)
    a = np.arange(n + 1, dtype=np.float32)
    out = np.full(n + 1, -7.0, dtype=np.float32)
    a_dev, out_dev = tvm.runtime.tensor(a, device), tvm.runtime.tensor(out, device)
    kernel(a_dev, out_dev)
    result = out_dev.numpy()
    np.testing.assert_array_equal(result[:n], a[:n] + 1)
    assert result[n] == -7.0  # past the grid: untouched


def test_devices_lists_the_vulkan_adapter(capsys):
    require_vulkan()
    code, out, _ = run(["devices", "--json"], capsys)
    assert code == 0
    found = json.loads(out)
    assert found["vulkan"] and found["vulkan"][0]["name"] == vulkan.describe(vulkan.adapters()[0])["name"]
    code, out, _ = run(["devices"], capsys)
    assert code == 0 and out.startswith("vulkan: ")


def test_bad_vulkan_requests_get_one_line(tmp_path, capsys, checkpoint, artifact):
    require_vulkan()
    code, _, err = run(["generate", artifact("tiny", variant="vulkan"), "--prompt", "Hi", "--device", "no-such-gpu"],
                       capsys)
    assert_one_line_error(code, err, "no Vulkan adapter 'no-such-gpu'", vulkan.describe(vulkan.adapters()[0])["name"])
    code, _, err = run(["compile", checkpoint("tiny"), "-o", tmp_path / "a", "--target", "vulkan", "--dtype",
                        "bfloat16"], capsys)
    assert_one_line_error(code, err, "WGSL has no bfloat16")
    assert not (tmp_path / "a").exists()
    code, _, err = run(["generate", artifact("tiny"), "--prompt", "Hi", "--device", "0"], capsys)
    assert_one_line_error(code, err, "--device picks a Vulkan adapter")


def test_missing_adapter_feature_is_named(monkeypatch, artifact, generator):
    generator("tiny", variant="vulkan")
    from gptj_tvm.core.errors import GptjError
    from gptj_tvm.runtime import model
    from gptj_tvm.runtime.artifact import ArtifactMetadata

    meta = ArtifactMetadata.read(artifact("float16", variant="vulkan"))
    assert meta.device_features == ["shader-f16"]
    monkeypatch.setattr(vulkan, "describe", lambda adapter: {"name": "old-gpu", "features": []})
    with pytest.raises(GptjError, match="old-gpu lacks shader-f16"):
        model.open_vulkan(meta, None, [])


def test_weight_past_the_adapters_buffer_limit_is_named(monkeypatch, artifact, generator):
    generator("tiny", variant="vulkan")
    from gptj_tvm.core.errors import GptjError
    from gptj_tvm.runtime.generator import Generator

    monkeypatch.setattr(vulkan, "max_buffer_bytes", lambda index: 1 << 20)
    with pytest.raises(GptjError, match=r"binds at most 1 MiB per buffer, and weight \S+ is \d+ MiB"):
        Generator.load(artifact("tiny", variant="vulkan"))


def test_kernels_past_webgpu_limits_are_named_at_compile_time():
    from gptj_tvm.core.errors import GptjError
    from gptj_tvm.targets.vulkan import check_limits

    @T.prim_func(s_tir=True)
    def nine_inputs(a0: T.Buffer((64,), "float32"), a1: T.Buffer((64,), "float32"), a2: T.Buffer((64,), "float32"),
                    a3: T.Buffer((64,), "float32"), a4: T.Buffer((64,), "float32"), a5: T.Buffer((64,), "float32"),
                    a6: T.Buffer((64,), "float32"), a7: T.Buffer((64,), "float32"), out: T.Buffer((64,), "float32")):
        for t in T.thread_binding(64, thread="threadIdx.x"):
            with T.sblock("sum"):
                i = T.axis.spatial(64, t)
                out[i] = a0[i] + a1[i] + a2[i] + a3[i] + a4[i] + a5[i] + a6[i] + a7[i]

    with pytest.raises(GptjError, match="nine_inputs_kernel binds 9 storage buffers; WebGPU grants 8"):
        check_limits(tvm.compile(tvm.IRModule({"nine_inputs": nine_inputs}), target=vulkan_target()))
