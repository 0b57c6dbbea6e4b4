"""The CLI from init-random to generate, and bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from gptj_tvm.cli import main
from gptj_tvm.runtime.artifact import ArtifactMetadata


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_init_random_compile_generate(tmp_path, capsys, checkpoint):
    model = tmp_path / "model"
    code, _, _ = run(["init-random", model, "--preset", "tiny", "--layers", "1", "--seed", "3", "--quiet"], capsys)
    assert code == 0
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "gptj" and config["n_layer"] == 1 and config["n_inner"] is None
    assert (model / "vocab.json").is_file() and (model / "merges.txt").is_file()
    with safe_open(str(model / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        for name in names:
            tensor = f.get_tensor(name)
            if name.endswith(".bias"):
                assert np.all(tensor != 0), name
            if "ln_" in name and name.endswith(".weight"):
                assert np.mean(np.abs(tensor - 1)) > 0.2, name
            if "ln_" in name and name.endswith(".bias"):
                assert np.mean(np.abs(tensor)) > 0.2, name
    assert "lm_head.bias" in names and "transformer.h.0.attn.q_proj.weight" in names
    code, _, _ = run(["compile", model, "-o", tmp_path / "art", "--quiet"], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "model"]  # nothing half-written left beside it
    code, out, _ = run(["generate", tmp_path / "art", "--prompt", "Hello", "--max-new-tokens", "4"], capsys)
    assert code == 0 and out.endswith("\n")


def test_every_command_has_help():
    for command in ([], ["init-random"], ["compile"], ["generate"], ["inspect"], ["tune"], ["demo"], ["devices"],
                    ["bench"], ["convert-weights"]):
        result = subprocess.run([sys.executable, "-m", "gptj_tvm.cli", *command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage: gptj-tvm" in result.stdout


def test_bench_times_the_artifact_next_to_its_bound(artifact, capsys):
    folder = artifact("tiny")
    code, out, _ = run(["bench", folder, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    meta = ArtifactMetadata.read(folder)
    assert result["weight_bytes"] == sum((folder / name).stat().st_size for name in meta.weight_files)
    assert result["prefill_128_tokens_per_s"] > 0 and result["decode_128_ms"] > 0  # the tiny context: 128
    assert result["peak_rss_bytes"] >= result["peak_rss_after_load_bytes"] > 0
    # the bound: the bytes a decode step reads (tests/test_bench.py checks them) over the best of the bandwidth
    # reads before and after the runs, per kernel too
    samples = result["read_bandwidth_samples_gb_s"]
    assert len(samples) == 2 and result["read_bandwidth_gb_s"] == max(samples) > 0
    kernels = result["decode_128_kernels"]
    assert result["decode_128_read_bytes"] == sum(row["read_bytes"] for row in kernels)
    assert result["decode_128_read_bytes"] < result["weight_bytes"]  # one row of the embedding, not all of it
    assert result["decode_128_bound_ms"] == pytest.approx(result["decode_128_read_bytes"] / (max(samples) * 1e9) * 1e3)
    assert result["decode_128_x_bound"] == pytest.approx(result["decode_128_ms"] / result["decode_128_bound_ms"])
    attention = next(row for row in kernels if row["name"] == "attention")
    assert attention["bound_ms"] == pytest.approx(attention["read_bytes"] / (max(samples) * 1e9) * 1e3)
    calls = {row["name"]: row["calls"] for row in kernels}
    assert calls["attention"] == calls["rotary_append"] == 2  # once per layer


@pytest.fixture
def broken(tmp_path, checkpoint):
    """A fresh copy of the tiny checkpoint to break."""
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint("tiny"), folder)
    return folder


def compile_fails(folder, tmp_path, capsys, *fragments, extra=()):
    code, _, err = run(["compile", folder, "-o", tmp_path / "out", "--quiet", *extra], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_config(broken, tmp_path, capsys):
    (broken / "config.json").unlink()
    compile_fails(broken, tmp_path, capsys, "config.json")


def test_not_a_gptj_config(broken, tmp_path, capsys):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    compile_fails(broken, tmp_path, capsys, "llama")


def test_config_that_is_not_json(broken, tmp_path, capsys):
    (broken / "config.json").write_text("{not json")
    compile_fails(broken, tmp_path, capsys, "config.json")


def test_truncated_safetensors(broken, tmp_path, capsys):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    compile_fails(broken, tmp_path, capsys, "model.safetensors")


def test_corrupt_safetensors(broken, tmp_path, capsys):
    (broken / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00garbage" * 10)
    compile_fails(broken, tmp_path, capsys, "model.safetensors")


def rewrite(folder, change):
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor(broken, tmp_path, capsys):
    rewrite(broken, lambda t: t.pop("transformer.h.1.mlp.fc_in.bias"))
    compile_fails(broken, tmp_path, capsys, "transformer.h.1.mlp.fc_in.bias", "missing")


def test_tensor_of_the_wrong_shape(broken, tmp_path, capsys):
    def change(t):
        t["transformer.h.0.attn.k_proj.weight"] = t["transformer.h.0.attn.k_proj.weight"][:, :32].copy()
    rewrite(broken, change)
    compile_fails(broken, tmp_path, capsys, "transformer.h.0.attn.k_proj.weight", "shape")


def test_checkpoint_with_more_layers_than_its_config(broken, tmp_path, capsys):
    config = json.loads((broken / "config.json").read_text())
    config["n_layer"] = 1
    (broken / "config.json").write_text(json.dumps(config))
    compile_fails(broken, tmp_path, capsys, "transformer.h.1.")


def test_unknown_target(checkpoint, tmp_path, capsys):
    compile_fails(checkpoint("tiny"), tmp_path, capsys, "unknown target", extra=["--target", "tpu"])


@pytest.mark.parametrize("target,message", [
    ("llvm -mcpu=pentium9000", "knows no such CPU"), ("llvm -mattr=avx2", "+NAME or -NAME"),
    ("llvm -mcpu", "is not -mcpu=NAME"), ("vulkan -mcpu=znver3", "options are for llvm targets")])
def test_bad_cpu_target(checkpoint, tmp_path, capsys, target, message):
    compile_fails(checkpoint("tiny"), tmp_path, capsys, message, extra=["--target", target])


def test_a_kernel_the_target_cannot_run(checkpoint, tmp_path, capsys):
    """Asking for AVX-512 VNNI on an AVX2 target is one line before LLVM sees the kernel (it would abort)."""
    compile_fails(checkpoint("tiny"), tmp_path, capsys, "avx512_vnni", extra=[
        "--target", "llvm -mcpu=haswell", "--quantization", "q8", "--quantized-gemm", "avx512-vnni"])


def test_unknown_dtype(checkpoint, tmp_path, capsys):
    compile_fails(checkpoint("tiny"), tmp_path, capsys, "unknown dtype", extra=["--dtype", "int3"])


def test_prefill_bucket_past_the_context(checkpoint, tmp_path, capsys):
    compile_fails(checkpoint("tiny"), tmp_path, capsys, "prefill buckets must be between 2 and the context (128)",
                  extra=["--prefill-buckets", "32,256"])
    code, _, err = run(["tune", checkpoint("tiny"), "-o", tmp_path / "db.json", "--prefill-buckets", "1"], capsys)
    assert_one_line_error(code, err, "prefill buckets")


def test_nonexistent_paths(tmp_path, capsys):
    compile_fails(tmp_path / "nothing", tmp_path, capsys, "nothing")
    code, _, err = run(["generate", tmp_path / "nothing", "--prompt", "x"], capsys)
    assert_one_line_error(code, err, "no such artifact")


def test_prompt_past_the_context(artifact, capsys):
    code, _, err = run(["generate", artifact("tiny"), "--prompt", "word " * 200], capsys)
    assert_one_line_error(code, err, "context")


def test_bad_prompt_ids_and_options(artifact, capsys):
    code, _, err = run(["generate", artifact("tiny"), "--prompt-ids", "1,x"], capsys)
    assert_one_line_error(code, err, "--prompt-ids")
    code, _, err = run(["generate", artifact("tiny"), "--prompt-ids", "1,99999"], capsys)
    assert_one_line_error(code, err, "99999")
    code, _, err = run(["generate", artifact("tiny"), "--prompt", "x", "--top-p", "0"], capsys)
    assert_one_line_error(code, err, "top_p")


@pytest.fixture
def artifact_copy(artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(artifact("tiny"), folder)
    return folder


def edit_metadata(folder, change):
    meta = json.loads((folder / "metadata.json").read_text())
    change(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_artifact_from_another_tvm_version(artifact_copy, capsys):
    edit_metadata(artifact_copy, lambda m: m.update(tvm_version="0.19.0"))
    code, _, err = run(["generate", artifact_copy, "--prompt", "x"], capsys)
    assert_one_line_error(code, err, "TVM 0.19.0")


def test_artifact_for_another_cpu(artifact_copy, capsys):
    edit_metadata(artifact_copy, lambda m: m.update(host_isa=m["host_isa"] + ["amx_fp8_imaginary"]))
    code, _, err = run(["generate", artifact_copy, "--prompt", "x"], capsys)
    assert_one_line_error(code, err, "amx_fp8_imaginary")


def test_artifact_with_a_truncated_weight_file(artifact_copy, capsys):
    weights = next(artifact_copy.glob("params-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(["generate", artifact_copy, "--prompt", "x"], capsys)
    assert_one_line_error(code, err, weights.name)


def test_folder_that_is_not_an_artifact(checkpoint, capsys):
    code, _, err = run(["generate", checkpoint("tiny"), "--prompt", "x"], capsys)
    assert_one_line_error(code, err, "not a gptj-tvm artifact")


def test_compile_without_weights_then_convert_weights(checkpoint, generator, tmp_path, capsys):
    folder = tmp_path / "later"
    code, out, _ = run(["compile", checkpoint("tiny"), "-o", folder, "--no-weights"], capsys)
    assert code == 0 and "convert-weights" in out
    assert not list(folder.glob("*.safetensors"))
    code, _, err = run(["generate", folder, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "compiled without weights", "convert-weights")
    assert run(["convert-weights", checkpoint("tiny"), folder, "--quiet"], capsys)[0] == 0
    import gptj_tvm

    ids = [464, 10730, 29598, 11]
    assert np.array_equal(gptj_tvm.load(folder).logits(ids), generator("tiny").logits(ids))


def test_convert_weights_refuses_a_checkpoint_of_another_config(checkpoint, artifact, tmp_path, capsys):
    folder = tmp_path / "a"
    shutil.copytree(artifact("tiny"), folder)
    before = (folder / "metadata.json").read_text()
    code, _, err = run(["convert-weights", checkpoint("wide"), folder], capsys)
    assert_one_line_error(code, err, "config differs from the artifact's", "n_embd")
    assert (folder / "metadata.json").read_text() == before
