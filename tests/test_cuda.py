"""CUDA artifacts, built here with nvcc (installed here; no GPU): every kernel thread-bound, machine code for the
arch in the library, the artifact complete and refusing to run without a GPU.

The GPU kernels' math runs on this CPU in test_model.py (variant "gpu-on-cpu"); running a CUDA artifact on a GPU
is benchmarks/cuda_device.py's job, on a machine that has one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from gptj_tvm.cli import main
from gptj_tvm.core.errors import GptjError
from gptj_tvm.frontend.config import PRESETS
from gptj_tvm.runtime.inspect import inspect_artifact
from gptj_tvm.targets import cuda
from gptj_tvm.compiler.compile import compile_model
from gptj_tvm.runtime.artifact import ArtifactMetadata

ARCHS = ("sm_80", "sm_90")
FULL_WIDTH = dataclasses.replace(PRESETS["gptj-6b"], n_layer=4, torch_dtype="float16")


@pytest.fixture(scope="session")
def cuda_artifact(tmp_path_factory, checkpoint):
    """cuda_artifact(model, arch) -> a float16 CUDA artifact without weights: "tiny", or "full-width" (4 layers of
    GPT-J-6B's shapes; the library is built from config.json alone)."""
    cache = {}

    def make(model: str, arch: str):
        if shutil.which("nvcc") is None:  # .ci/run fails without nvcc, so CI never skips these
            pytest.skip("nvcc is not on PATH: building a CUDA library needs the CUDA toolkit")
        if (model, arch) not in cache:
            if model == "tiny":
                source = checkpoint("tiny")
            else:
                source = tmp_path_factory.mktemp("config") / model
                source.mkdir()
                (source / "config.json").write_text(json.dumps(FULL_WIDTH.to_dict()))
            folder = tmp_path_factory.mktemp("cuda") / f"{model}-{arch}"
            compile_model(source, folder, target="cuda", arch=arch, dtype="float16", weights=False, progress=False)
            cache[model, arch] = folder
        return cache[model, arch]

    return make


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("model", ["tiny", "full-width"])
def test_cuda_artifact_has_thread_bound_kernels_for_its_arch(model, arch, cuda_artifact):
    folder = cuda_artifact(model, arch)
    meta = ArtifactMetadata.read(folder)
    assert meta.device == "cuda" and meta.target["arch"] == arch and meta.layouts["blocks"] == "rows"
    assert "unscheduled" not in meta.kernels.values()
    # what the library will launch, read back from it: every kernel has threads, the code is for this arch
    kernels, fatbin = cuda.embedded_cuda_module(folder / "model.so")
    assert set(kernels) == {f"{name}_kernel" for name in meta.kernels}
    assert all("threadIdx.x" in launch for launch in kernels.values()), kernels
    assert ("elf", int(arch[3:])) in cuda.fatbin_contents(fatbin)
    # the decode GEMVs take dlight's GEMV rule: [out, in] weights, a cross-thread sum per output row
    report = inspect_artifact(folder, run=False)
    assert report["decode_kernels_per_block"] == 5
    block = report["decode_block_kernels"]
    assert block[2:4] == ["rotary_append", "attention"]
    assert [meta.kernels[name] for name in (block[1], block[4])] == ["default GEMV", "default GEMV"]
    # the serving engine's batched step is built too, its attention kernels thread-bound like the rest
    assert "step" in meta.functions
    assert {"batch_rotary_append", "batch_attention"} <= set(meta.kernel_calls["step"])


def test_a_kernel_without_threads_is_refused(checkpoint, tmp_path, monkeypatch):
    from gptj_tvm.schedules import default

    monkeypatch.setattr(default, "gpu_rules", lambda: [])  # nothing schedules the legalized kernels
    with pytest.raises(GptjError, match="has no GPU thread binding") as err:
        compile_model(checkpoint("tiny"), tmp_path / "a", target="cuda", arch="sm_80", dtype="float16",
                      weights=False, progress=False)
    assert "rotary_append" not in str(err.value).split(":")[0]  # the hand-written kernels are bound
    assert not (tmp_path / "a").exists()


def test_unbound_kernels_names_them():
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def serial(a: T.Buffer((4,), "float32")):
        for i in range(4):
            a[i] = T.float32(1)

    assert cuda.unbound_kernels(tvm.IRModule({"serial": serial})) == ["serial"]


def test_cuda_artifact_needs_weights_then_a_gpu(cuda_artifact, checkpoint, tmp_path, capsys):
    folder = tmp_path / "tiny-cuda"
    shutil.copytree(cuda_artifact("tiny", "sm_80"), folder)
    code = main(["generate", str(folder), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "convert-weights" in err
    assert main(["convert-weights", str(checkpoint("tiny")), str(folder), "--quiet"]) == 0
    meta = ArtifactMetadata.read(folder)
    assert not meta.weights_pending and meta.weight_files
    code = main(["generate", str(folder), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "needs a cuda device" in err


@pytest.mark.parametrize("args,fragment", [
    (["--target", "cuda"], "pass --arch"),
    (["--target", "cuda", "--arch", "ampere"], "unknown CUDA arch"),
    (["--arch", "sm_80"], "--arch is for --target cuda"),
])
def test_bad_cuda_options(args, fragment, checkpoint, tmp_path, capsys):
    code = main(["compile", str(checkpoint("tiny")), "-o", str(tmp_path / "a"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_tune_for_cuda_says_it_is_not_there_yet(checkpoint, tmp_path, capsys):
    code = main(["tune", str(checkpoint("tiny")), "-o", str(tmp_path / "db.json"), "--target", "cuda",
                 "--arch", "sm_90", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--target llvm" in err
    assert not (tmp_path / "db.json").exists()
