"""Shared fixtures: checkpoints and compiled artifacts, each built once per test session."""

from __future__ import annotations

import dataclasses

import pytest
import tvm  # noqa: F401  (the full TVM, compiler included, before any in-process `generate` could choose the
#                          runtime library alone: gptj_tvm.cli does that for processes that only run artifacts)

from gptj_tvm.frontend.config import PRESETS, GPTJConfig
from gptj_tvm.frontend.random_checkpoint import write_random_checkpoint


TINY = PRESETS["tiny"]
CONFIGS = {
    "tiny": TINY,
    # the real model's head: head_dim 256, rotary 64 of it
    "wide": GPTJConfig(vocab_size=1000, n_positions=64, n_embd=512, n_layer=2, n_head=2, rotary_dim=64,
                       eos_token_id=999, bos_token_id=999),
    # odd sizes everywhere: 3 heads of 16, rotary 6, d_ff 72, vocab 1003
    "odd": GPTJConfig(vocab_size=1003, n_positions=40, n_embd=48, n_layer=3, n_head=3, rotary_dim=6, n_inner=72,
                      eos_token_id=1002, bos_token_id=1002, layer_norm_epsilon=1e-6),
    "float16": dataclasses.replace(TINY, torch_dtype="float16"),
    "bfloat16": dataclasses.replace(TINY, torch_dtype="bfloat16"),
}
# bfloat16 CPU GEMMs read column pairs (frontend/layouts/column_pairs.py) in tiles of 8 to 64 columns; here W_in's 180
# columns (fc_in's 36 unfused) take none and stay in column tiles
CONFIGS["odd-bf16"] = dataclasses.replace(CONFIGS["odd"], n_inner=36, torch_dtype="bfloat16")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, shard_bytes=...) -> folder of a random HF checkpoint of CONFIGS[name]."""
    cache = {}

    def make(name: str, shard_bytes: int = 2 << 30):
        key = (name, shard_bytes)
        if key not in cache:
            folder = tmp_path_factory.mktemp("ckpt") / f"{name}-{shard_bytes}"
            write_random_checkpoint(folder, CONFIGS[name], seed=1, shard_bytes=shard_bytes)
            cache[key] = folder
        return cache[key]

    return make


def variants():
    from gptj_tvm.compiler.options import GPU_ON_CPU

    # "cpu": what compile picks for this CPU; "gpu-on-cpu": the GPU graph ([out, in] weights, thread-block
    # attention kernels) compiled for this CPU; "vulkan": `--target vulkan`, run on the first Vulkan adapter
    # (Mesa's lavapipe in CI)
    return {"cpu": None, "gpu-on-cpu": GPU_ON_CPU, "vulkan": None}


def require_vulkan() -> None:
    """Skip where no Vulkan driver exists (CI installs lavapipe, so CI runs these)."""
    from gptj_tvm.runtime import vulkan

    if not vulkan.adapters():
        pytest.skip("no Vulkan adapter on this machine (apt-get install mesa-vulkan-drivers)")


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoint):
    """artifact(name, **checkpoint options) -> folder of the compiled artifact of that checkpoint."""
    from gptj_tvm.compiler.compile import compile_model

    cache = {}

    def make(name: str, shard_bytes: int = 2 << 30, fuse_block: bool = True, variant: str = "cpu"):
        key = (name, shard_bytes, fuse_block, variant)
        if key not in cache:
            folder = tmp_path_factory.mktemp("artifact") / f"{name}-{shard_bytes}-{fuse_block}-{variant}"
            compile_model(checkpoint(name, shard_bytes), folder, fuse_block=fuse_block, progress=False,
                          variant=variants()[variant], target="vulkan" if variant == "vulkan" else "llvm")
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def generator(artifact):
    import gptj_tvm

    cache = {}

    def make(name: str, shard_bytes: int = 2 << 30, fuse_block: bool = True, variant: str = "cpu"):
        key = (name, shard_bytes, fuse_block, variant)
        if variant == "vulkan":
            require_vulkan()
        if key not in cache:
            cache[key] = gptj_tvm.load(artifact(name, shard_bytes, fuse_block, variant))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def reference(checkpoint):
    from reference import ReferenceGPTJ

    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = ReferenceGPTJ(checkpoint(name))
        return cache[name]

    return make
