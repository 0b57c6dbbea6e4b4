"""GPT-J as a Relax `nn.Module`: the math of GPTJ-MATH.md, with a KV cache, batch 1.

Weights are stored in the layout the kernels read (see `weights.py` for the map from Hugging Face names):
every linear weight is [in_features, out_features], so `y = x @ W + b` runs with no transpose. Half-precision
models keep LayerNorm statistics, rotary angles, softmax and matmul accumulation in float32.

Exported functions (each takes the packed weights and the KV caches, and returns logits and the caches):
    prefill(input_ids[1, n], total_len)       logits of the last position, [1, 1, padded_vocab] float32
    prefill_all(input_ids[1, n], total_len)   logits of every position, [1, n, padded_vocab] float32
    decode(input_ids[1, 1], total_len)        one new token, [1, 1, padded_vocab] float32
`total_len` is the number of tokens in the cache after this call (past + n). The logits of the padded
columns (config.padded_vocab_size - vocab_size) are meaningless; the runtime drops them.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .config import GELU_NEW_COEFF, GELU_NEW_SCALE, GPTJConfig

F32 = "float32"


class Linear(nn.Module):
    """y = x @ weight + bias, weight stored [in, out]; half precision accumulates in float32."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool):
        self.weight = nn.Parameter((in_features, out_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None
        self.dtype = dtype

    def forward_f32(self, x: nn.Tensor) -> nn.Tensor:
        """The float32 result, before rounding to the model dtype."""
        y = op.matmul(x, self.weight, out_dtype=F32 if self.dtype != F32 else None)
        if self.bias is not None:
            y = y + (self.bias if self.dtype == F32 else op.astype(self.bias, F32))
        return y

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = self.forward_f32(x)
        return y if self.dtype == F32 else op.astype(y, self.dtype)


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: str):
        self.weight = nn.Parameter((n,), dtype)
        self.bias = nn.Parameter((n,), dtype)
        self.eps = eps
        self.dtype = dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.dtype == F32:
            return op.layer_norm(x, x.shape[-1], self.weight, self.bias, eps=self.eps)
        y = op.layer_norm(op.astype(x, F32), x.shape[-1], op.astype(self.weight, F32),
                          op.astype(self.bias, F32), eps=self.eps)
        return op.astype(y, self.dtype)


def embed(table: nn.Tensor, ids: nn.Tensor) -> nn.Tensor:
    # "clip" keeps a bad id in bounds; the default "fast" mode would read out of bounds (and warns at build).
    return op.wrap_nested(relax.op.take(table._expr, ids._expr, axis=0, mode="clip"), name="embed")


def gelu_new(x: nn.Tensor) -> nn.Tensor:
    return 0.5 * x * (1.0 + op.tanh(GELU_NEW_SCALE * (x + GELU_NEW_COEFF * x * x * x)))


def apply_rotary(x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor, total: tirx.PrimExpr, rotary_dim: int):
    """GPT-J's interleaved rotary ("rotate every two") on the first rotary_dim dims of each head of
    x [1, n, heads, head_dim], at positions total - n .. total - 1, computed in float32."""

    def compute(x: te.Tensor, cos: te.Tensor, sin: te.Tensor, total: tirx.PrimExpr):
        def element(b, t, h, d):
            pos = t + total - x.shape[1]
            pair = d // 2
            c = cos[pos, pair]
            s = sin[pos, pair]
            here = x[b, t, h, d].astype(F32)
            partner = x[b, t, h, tirx.if_then_else(d % 2 == 0, d + 1, d - 1)].astype(F32)
            signed = tirx.if_then_else(d % 2 == 0, -partner, partner)
            rotated = (here * c + signed * s).astype(x.dtype)
            return tirx.if_then_else(d < rotary_dim, rotated, x[b, t, h, d])

        return te.compute(x.shape, element, name="rotary")

    return op.tensor_expr_op(compute, "rotary", [x, cos, sin, total])


def causal_mask(n: tirx.PrimExpr, total: tirx.PrimExpr) -> nn.Tensor:
    """[1, 1, n, total] float32: 0 where query i (at position total - n + i) may see key j, else -inf."""

    def compute(n: tirx.PrimExpr, total: tirx.PrimExpr):
        return te.compute(
            (1, 1, n, total),
            lambda _b, _h, i, j: tirx.if_then_else(j <= i + (total - n), tirx.const(0.0, F32),
                                                   tirx.min_value(F32)),
            name="causal_mask",
        )

    return op.tensor_expr_op(compute, "causal_mask", [n, total])


def last_position(h: nn.Tensor) -> nn.Tensor:
    """[1, n, d] -> [1, 1, d]: only the last position's logits are needed to generate."""

    def compute(h: te.Tensor):
        return te.compute((1, 1, h.shape[2]), lambda b, _t, c: h[b, h.shape[1] - 1, c], name="last_position")

    return op.tensor_expr_op(compute, "last_position", [h])


class Attention(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str):
        d = config.n_embd
        self.q_proj = Linear(d, d, dtype, bias=False)
        self.k_proj = Linear(d, d, dtype, bias=False)
        self.v_proj = Linear(d, d, dtype, bias=False)
        self.out_proj = Linear(d, d, dtype, bias=False)
        self.k_cache = nn.KVCache(config.n_positions, [config.n_head, config.head_dim], dtype)
        self.v_cache = nn.KVCache(config.n_positions, [config.n_head, config.head_dim], dtype)
        self.config = config
        self.dtype = dtype

    def forward(self, x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor, total: tirx.PrimExpr):
        c = self.config
        _, n, _ = x.shape
        heads = (1, n, c.n_head, c.head_dim)
        q = apply_rotary(op.reshape(self.q_proj(x), heads), cos, sin, total, c.rotary_dim)
        k = apply_rotary(op.reshape(self.k_proj(x), heads), cos, sin, total, c.rotary_dim)
        v = op.reshape(self.v_proj(x), heads)
        self.k_cache.append(op.squeeze(k, axis=0))
        self.v_cache.append(op.squeeze(v, axis=0))
        keys = op.reshape(self.k_cache.view(total), (1, total, c.n_head, c.head_dim))
        values = op.reshape(self.v_cache.view(total), (1, total, c.n_head, c.head_dim))

        scores = op.matmul(op.permute_dims(q, [0, 2, 1, 3]), op.permute_dims(keys, [0, 2, 3, 1]), out_dtype=F32)
        scores = scores * (1.0 / float(np.sqrt(np.float32(c.head_dim)))) + causal_mask(n, total)
        probs = op.astype(op.softmax(scores, axis=-1), self.dtype)
        out = op.matmul(probs, op.permute_dims(values, [0, 2, 1, 3]), out_dtype=F32)
        out = op.reshape(op.permute_dims(op.astype(out, self.dtype), [0, 2, 1, 3]), (1, n, c.n_embd))
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str):
        self.fc_in = Linear(config.n_embd, config.d_ff, dtype, bias=True)
        self.fc_out = Linear(config.d_ff, config.n_embd, dtype, bias=True)
        self.dtype = dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # gelu_new in float32: its constants rounded to bfloat16 (0.0447, 0.797) would shift every activation
        hidden = gelu_new(self.fc_in.forward_f32(x))
        return self.fc_out(hidden if self.dtype == F32 else op.astype(hidden, self.dtype))


class Block(nn.Module):
    """The parallel residual: h + Attn(LN(h)) + FFN(LN(h)), one LayerNorm."""

    def __init__(self, config: GPTJConfig, dtype: str):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        self.attn = Attention(config, dtype)
        self.mlp = MLP(config, dtype)

    def forward(self, h: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor, total: tirx.PrimExpr) -> nn.Tensor:
        x = self.ln_1(h)
        return self.attn(x, cos, sin, total) + self.mlp(x) + h


class Rotary(nn.Module):
    def __init__(self, config: GPTJConfig):
        self.cos = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)
        self.sin = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)


class GPTJ(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str):
        self.config = config
        self.dtype = dtype
        self.wte = nn.Parameter((config.vocab_size, config.n_embd), dtype)
        self.rotary = Rotary(config)
        self.h = nn.ModuleList([Block(config, dtype) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, dtype, bias=True)  # zero-padded columns

    def _hidden(self, input_ids: nn.Tensor, total: tirx.PrimExpr) -> nn.Tensor:
        h = op.reshape(embed(self.wte, op.reshape(input_ids, (-1,))), (1, input_ids.shape[1], -1))
        for block in self.h:
            h = block(h, self.rotary.cos, self.rotary.sin, total)
        return self.ln_f(h)

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        logits = self.lm_head(h)
        return logits if self.dtype == F32 else op.astype(logits, F32)

    def prefill(self, input_ids: nn.Tensor, total_len: tirx.Var):
        h = self._hidden(input_ids, total_len)
        return self._logits(last_position(h))

    def prefill_all(self, input_ids: nn.Tensor, total_len: tirx.Var):
        return self._logits(self._hidden(input_ids, total_len))

    def decode(self, input_ids: nn.Tensor, total_len: tirx.Var):
        return self._logits(self._hidden(input_ids, total_len))

    def get_default_spec(self):
        ids = lambda n: nn.spec.Tensor([1, n], "int32")  # noqa: E731
        modes = {"param_mode": "packed", "effect_mode": "packed"}
        return nn.spec.ModuleSpec.from_raw({
            "prefill": {"input_ids": ids("seq_len"), "total_len": int, "$": modes},
            "prefill_all": {"input_ids": ids("seq_len"), "total_len": int, "$": modes},
            "decode": {"input_ids": ids(1), "total_len": int, "$": modes},
        }, self)
