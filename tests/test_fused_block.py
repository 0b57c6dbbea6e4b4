"""The fused block (merged projections, five kernels) computes what the plain graph computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference import rel_max_error
from test_model import TOLERANCE, prompt_for
from gptj_tvm.runtime.artifact import ArtifactMetadata


@pytest.mark.parametrize("name", ["tiny", "wide", "odd", "float16", "bfloat16", "odd-bf16"])
def test_fused_and_plain_graphs_agree(name, generator, reference):
    fused, plain = generator(name), generator(name, fuse_block=False)
    ids = prompt_for(fused)
    fused_logits, plain_logits = fused.logits(ids), plain.logits(ids)
    if name in ("float16", "bfloat16", "odd-bf16"):  # they round at different points; both stay near the math
        expected = reference(name).logits(ids)
        assert rel_max_error(plain_logits, expected) < TOLERANCE[name]
        assert rel_max_error(fused_logits, expected) < TOLERANCE[name]
    else:
        assert rel_max_error(fused_logits, plain_logits) < 1e-5


def test_fused_artifact_stores_merged_weights(artifact):
    folder = artifact("wide")
    meta = ArtifactMetadata.read(folder)
    assert meta.fuse_block is True
    assert "h.0.w_in.weight" in meta.params and "h.0.attn.q_proj.weight" not in meta.params
    plain = ArtifactMetadata.read(artifact("wide", fuse_block=False))
    assert plain.fuse_block is False and "h.0.attn.q_proj.weight" in plain.params


def test_merged_weights_are_the_checkpoints_projections(checkpoint):
    """w_in = [q | k | v | fc_in] (transposed), b_in = [0 | fc_in bias], w_out = [out_proj ; fc_out], each
    stored in column tiles [out / t, in, t]."""
    from gptj_tvm.frontend.config import GPTJConfig
    from gptj_tvm.frontend.layouts import LayoutPlan
    from gptj_tvm.frontend.weights import Checkpoint

    folder = checkpoint("odd")
    ckpt = Checkpoint(folder, GPTJConfig.from_file(folder / "config.json"))
    ours = dict(ckpt.converted("float32", LayoutPlan(), fuse_block=True))
    hf = lambda name: ckpt.read(f"transformer.h.1.{name}")  # noqa: E731
    d = ckpt.config.n_embd
    expected_in = np.concatenate([hf("attn.q_proj.weight").T, hf("attn.k_proj.weight").T,
                                  hf("attn.v_proj.weight").T, hf("mlp.fc_in.weight").T], axis=1)
    untile = lambda w: w.transpose(1, 0, 2).reshape(w.shape[1], -1)  # noqa: E731
    assert ours["h.1.w_in.weight"].ndim == 3
    np.testing.assert_array_equal(untile(ours["h.1.w_in.weight"]), expected_in)
    np.testing.assert_array_equal(ours["h.1.w_in.bias"], np.concatenate([np.zeros(3 * d), hf("mlp.fc_in.bias")]))
    expected_out = np.concatenate([hf("attn.out_proj.weight").T, hf("mlp.fc_out.weight").T], axis=0)
    np.testing.assert_array_equal(untile(ours["h.1.w_out.weight"]), expected_out)
    np.testing.assert_array_equal(ours["h.1.w_out.bias"], hf("mlp.fc_out.bias"))


def test_inspect_counts_five_decode_kernels_per_fused_block(artifact, capsys):
    from gptj_tvm.cli import main

    assert main(["inspect", str(artifact("tiny")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decode_kernels_per_block"] <= 6
    names = report["decode_block_kernels"]
    assert len(names) == 5 and "rotary_append" in names and "attention" in names
    assert sum(report["kernels"][n]["schedule"] == "default CPUMatmul" for n in names) == 2
    # every launch of a decode step is accounted for: blocks plus embedding, final LayerNorm and lm_head
    assert report["decode_kernel_launches"] == report["n_layer"] * 5 + 3
    assert report["weight_bytes_per_block"] > 0 and report["weight_bytes"] > report["weight_bytes_per_block"]


def test_inspect_shows_the_plain_graph_needs_more_kernels(artifact, capsys):
    from gptj_tvm.cli import main

    assert main(["inspect", str(artifact("tiny", fuse_block=False)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fuse_block"] is False and report["decode_kernels_per_block"] > 6
