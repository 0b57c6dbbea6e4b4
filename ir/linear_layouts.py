"""Pass: give every linear of a GPT-J model the weight layout it is compiled for.

Expects: a `frontend.model.GPTJ` (plain or merged blocks) whose linears are `Linear`s in any layout.
Leaves: the same model with each `Linear` rebuilt in the layout a `frontend.layouts.LayoutPlan` gives it by its
name (the blocks' layout, lm_head's layout, each with its fallback for a weight it cannot hold): column pairs
for bfloat16 CPU artifacts, rows for GPUs, q8/q4 for quantized ones. Parameters change shape and number here
(a quantized linear has a weight and a scale), before export, and weight conversion asks the same plan.

A module-level pass, like merge_projections: the quantization of a model is this swap, not a model option.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.visitor import Mutator

from gptj_tvm.frontend.layouts import LayoutPlan
from gptj_tvm.frontend.model import GPTJ, Linear


class _LayoutSwapper(Mutator):
    def __init__(self, plan: LayoutPlan):
        self.plan = plan

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, Linear):
            layout = self.plan.layout_for(name, node.in_features, node.out_features)
            bias = node.bias is not None
            return Linear(node.in_features, node.out_features, node.dtype, bias, layout)
        return super().visit_module(name, node)


def lay_out_linears(model: GPTJ, plan: LayoutPlan) -> GPTJ:
    return _LayoutSwapper(plan).visit("", model)
