"""The fused block (merged projections, five kernels) computes what the plain graph computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference import rel_max_error
from test_model import TOLERANCE, prompt_for


@pytest.mark.parametrize("name", ["tiny", "wide", "odd", "float16", "bfloat16"])
def test_fused_and_plain_graphs_agree(name, generator, reference):
    fused, plain = generator(name), generator(name, fuse_block=False)
    ids = prompt_for(fused)
    fused_logits, plain_logits = fused.logits(ids), plain.logits(ids)
    if name in ("float16", "bfloat16"):  # they round at different points; both stay as close to the math
        expected = reference(name).logits(ids)
        assert rel_max_error(plain_logits, expected) < TOLERANCE[name]
        assert rel_max_error(fused_logits, expected) < TOLERANCE[name]
    else:
        assert rel_max_error(fused_logits, plain_logits) < 1e-5


def test_fused_artifact_stores_merged_weights(artifact):
    folder = artifact("wide")
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["fuse_block"] is True
    assert "h.0.w_in.weight" in meta["params"] and "h.0.attn.q_proj.weight" not in meta["params"]
    plain = json.loads((artifact("wide", fuse_block=False) / "metadata.json").read_text())
    assert plain["fuse_block"] is False and "h.0.attn.q_proj.weight" in plain["params"]


def test_merged_weights_are_the_checkpoints_projections(checkpoint):
    """w_in = [q | k | v | fc_in] (transposed), b_in = [0 | fc_in bias], w_out = [out_proj ; fc_out]."""
    from gptj_tvm.frontend.config import GPTJConfig
    from gptj_tvm.frontend.weights import Checkpoint

    folder = checkpoint("odd")
    ckpt = Checkpoint(folder, GPTJConfig.from_file(folder / "config.json"))
    ours = dict(ckpt.converted("float32", fuse_block=True))
    hf = lambda name: ckpt.read(f"transformer.h.1.{name}")  # noqa: E731
    d = ckpt.config.n_embd
    expected_in = np.concatenate([hf("attn.q_proj.weight").T, hf("attn.k_proj.weight").T,
                                  hf("attn.v_proj.weight").T, hf("mlp.fc_in.weight").T], axis=1)
    np.testing.assert_array_equal(ours["h.1.w_in.weight"], expected_in)
    np.testing.assert_array_equal(ours["h.1.w_in.bias"], np.concatenate([np.zeros(3 * d), hf("mlp.fc_in.bias")]))
    expected_out = np.concatenate([hf("attn.out_proj.weight").T, hf("mlp.fc_out.weight").T], axis=0)
    np.testing.assert_array_equal(ours["h.1.w_out.weight"], expected_out)
    np.testing.assert_array_equal(ours["h.1.w_out.bias"], hf("mlp.fc_out.bias"))
