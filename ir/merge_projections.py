"""Pass: merge each GPT-J block's six projections into two GEMMs.

Expects: a `frontend.model.GPTJ` whose blocks are plain `Block`s (q_proj, k_proj, v_proj and fc_in each read
LN(h); out_proj and fc_out each feed the residual sum).
Leaves: the same model with every block a `FusedBlock` (its linears in column tiles): [q | k | v | f] =
LN(h) W_in + b_in reads the normalized input once, and [attn | gelu_new(f)] W_out + b_out + h writes the
block's output once. The new
parameters are h.{i}.w_in.{weight,bias} and h.{i}.w_out.{weight,bias}; `frontend.weights.hf_name_map(config,
fuse_block=True)` builds them from the checkpoint at conversion, so no weight is concatenated at run time.

A module-level pass (like MLC-LLM's quantization passes): parameters only change shape here, before export,
so the Relax graph, the packed parameter tuple and the weight conversion stay in step.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.visitor import Mutator

from gptj_tvm.frontend.model import GPTJ, Block, FusedBlock


class _BlockMerger(Mutator):
    def __init__(self):
        self.merged = 0

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, Block):
            self.merged += 1
            return FusedBlock(node.config, node.dtype, node.gpu_loops)
        return super().visit_module(name, node)


def merge_block_projections(model: GPTJ) -> GPTJ:
    merger = _BlockMerger()
    model = merger.visit("", model)
    if merger.merged != model.config.n_layer:
        raise ValueError(f"merged {merger.merged} blocks of {model.config.n_layer}: not a plain GPTJ")
    return model
