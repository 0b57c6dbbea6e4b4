"""GPT-J as a Relax `nn.Module`: the math of docs/GPTJ-MATH.md, with a KV cache, batch 1.

Every linear is built in column tiles; the compile pipeline swaps in the layout its target runs
(frontend/layouts/, ir/linear_layouts.py), and weights.py converts a checkpoint to the same layouts, so no kernel
transposes a weight at run time. The attention kernels come from tir_kernels/: the CPU's, or with `gpu_loops` the
thread-block form. Half-precision models keep the residual stream, LayerNorm statistics, rotary angles,
softmax and matmul accumulation in float32; the model dtype is what the weights, the KV cache and the GEMMs'
inputs are stored in.

Exported functions (each also takes the packed weights last):
    prefill(input_ids[1, n], caches, total_len)       logits of the last position, [1, 1, padded_vocab] float32
    prefill_all(input_ids[1, n], caches, total_len)   logits of every position, [1, n, padded_vocab] float32
    decode(input_ids[1, 1], caches, total_len)        one new token, [1, 1, padded_vocab] float32
    prefill_B(input_ids[1, B], caches, total_len)     prefill of exactly B tokens (the prefill buckets)
`caches` are 2 * n_layer tensors [capacity, n_head, head_dim] (k, v of each layer; capacity up to n_positions,
chosen by the runtime for each sequence) that the functions write in place; `total_len` is the number of
tokens in them after the call (past + n). The logits of the padded
columns (config.padded_vocab_size - vocab_size) are meaningless; the runtime drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from gptj_tvm.core.constants import GELU_NEW_COEFF, GELU_NEW_SCALE
from gptj_tvm.tir_kernels import attention as cpu_attention
from gptj_tvm.tir_kernels import batch_attention, gpu_attention
from gptj_tvm.tir_kernels.attention import AttentionShape

from .config import GPTJConfig, bucket_function, exported_functions
from .layouts import COLUMN_TILES, LinearLayout

F32 = "float32"


class Linear(nn.Module):
    """y = x @ W + bias, accumulated in float32, with W stored as its layout says (frontend/layouts/: column
    tiles until ir/linear_layouts.py swaps in the compiled model's). Biases are stored in float32: they are
    tiny, and a cast of a weight would run every step."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool,
                 layout: LinearLayout = COLUMN_TILES):
        for name, (shape, param_dtype) in layout.parameters(in_features, out_features, dtype).items():
            setattr(self, name, nn.Parameter(shape, param_dtype))
        self.bias = nn.Parameter((out_features,), F32) if bias else None
        self.dtype = dtype
        self.layout = layout
        self.in_features, self.out_features = in_features, out_features

    def forward_f32(self, x: nn.Tensor, residual: nn.Tensor | None = None) -> nn.Tensor:
        """The float32 result (+ residual, float32), before rounding to the model dtype."""
        params = {name: getattr(self, name) for name in self.layout.parameters(self.in_features, self.out_features,
                                                                                 self.dtype)}
        return self.layout.forward(x, params, self.in_features, self.out_features, self.bias, residual)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = self.forward_f32(x)
        return y if self.dtype == F32 else op.astype(y, self.dtype)


class LayerNorm(nn.Module):
    """float32 in (the residual stream), the model dtype out; weight and bias stored in float32 (weights.py)."""

    def __init__(self, n: int, eps: float, dtype: str):
        self.weight = nn.Parameter((n,), F32)
        self.bias = nn.Parameter((n,), F32)
        self.eps = eps
        self.dtype = dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = op.layer_norm(x, x.shape[-1], self.weight, self.bias, eps=self.eps)
        return y if self.dtype == F32 else op.astype(y, self.dtype)


def embed(table: nn.Tensor, ids: nn.Tensor) -> nn.Tensor:
    # "clip" keeps a bad id in bounds; the default "fast" mode would read out of bounds (and warns at build).
    return op.wrap_nested(relax.op.take(table._expr, ids._expr, axis=0, mode="clip"), name="embed")


def gelu_new(x: nn.Tensor) -> nn.Tensor:
    return 0.5 * x * (1.0 + op.tanh(GELU_NEW_SCALE * (x + GELU_NEW_COEFF * x * x * x)))


def last_position(h: nn.Tensor) -> nn.Tensor:
    """[1, n, d] -> [1, 1, d]: only the last position's logits are needed to generate."""

    def compute(h: te.Tensor):
        return te.compute((1, 1, h.shape[2]), lambda b, _t, c: h[b, h.shape[1] - 1, c], name="last_position")

    return op.tensor_expr_op(compute, "last_position", [h])


class Cache:
    """One layer's key and value caches, [n_positions, n_head, head_dim] each, updated in place."""

    def __init__(self, keys: nn.Tensor, values: nn.Tensor):
        self.keys, self.values = keys, values


@dataclass
class BatchRows:
    """Where the rows of a batched step belong (the serving engine's `step`): row t is a token of the sequence
    in cache slot slots[t], at position positions[t] of it."""
    slots: nn.Tensor
    positions: nn.Tensor


def attention_shape(config: GPTJConfig) -> AttentionShape:
    return AttentionShape(config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.d_ff)


def rotary_append(config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None, qkv: nn.Tensor,
                  rotary: "Rotary", cache: Cache, total: "tirx.PrimExpr | BatchRows",
                  ffn_offset: int | None) -> tuple[nn.Tensor, nn.Tensor]:
    """Rotates q and k, appends k and v to the cache (one kernel); with ffn_offset, also gelu_new of the FFN
    columns into out[:, :, d:]. Returns q and out [1, n, d (+ d_ff)]."""
    _, n, width = qkv.shape
    out_width = config.n_embd + (config.d_ff if ffn_offset is not None else 0)
    outputs = ([nn.Tensor.placeholder(cache.keys.shape, dtype)] * 2
               + [nn.Tensor.placeholder([1, n, config.n_head, config.head_dim], dtype),
                  nn.Tensor.placeholder([1, n, out_width], dtype)])
    if isinstance(total, BatchRows):
        if gpu_loops is None:
            kernel = batch_attention.batch_rotary_append(attention_shape(config), dtype, int(width), ffn_offset)
        else:
            kernel = gpu_attention.batch_rotary_append(attention_shape(config), dtype, int(width), ffn_offset,
                                                       gpu_loops)
        keys, values, q, out = op.tensor_ir_inplace_op(
            kernel, "batch_rotary_append",
            [qkv, rotary.cos, rotary.sin, cache.keys, cache.values, total.slots, total.positions], [3, 4, -1, -1],
            outputs)
        cache.keys, cache.values = keys, values
        return q, out
    if gpu_loops is None:
        kernel = cpu_attention.rotary_append(attention_shape(config), dtype, int(width), ffn_offset)
    else:
        kernel = gpu_attention.rotary_append(attention_shape(config), dtype, int(width), ffn_offset, gpu_loops)
    keys, values, q, out = op.tensor_ir_inplace_op(
        kernel, "rotary_append",
        [qkv, rotary.cos, rotary.sin, cache.keys, cache.values, total], [3, 4, -1, -1], outputs)
    cache.keys, cache.values = keys, values
    return q, out


def attention(config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None, q: nn.Tensor, cache: Cache,
              out: nn.Tensor, total: "tirx.PrimExpr | BatchRows") -> nn.Tensor:
    """Causal attention of q over the cache, written into out[:, :, :n_embd] (in place)."""
    width = int(out.shape[2])
    if isinstance(total, BatchRows):
        if gpu_loops is None:
            kernel = batch_attention.batch_attention(attention_shape(config), dtype, width)
        else:
            kernel = gpu_attention.attention(attention_shape(config), dtype, width, gpu_loops, batched=True)
        return op.tensor_ir_inplace_op(kernel, "batch_attention",
                                       [q, cache.keys, cache.values, total.slots, total.positions, out], [5],
                                       nn.Tensor.placeholder(out.shape, dtype))
    if gpu_loops is None:
        kernel = cpu_attention.attention(attention_shape(config), dtype, width)
    else:
        kernel = gpu_attention.attention(attention_shape(config), dtype, width, gpu_loops)
    return op.tensor_ir_inplace_op(
        kernel, "attention",
        [q, cache.keys, cache.values, out, total], [3], nn.Tensor.placeholder(out.shape, dtype))


class Attention(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None):
        d = config.n_embd
        self.q_proj = Linear(d, d, dtype, bias=False)
        self.k_proj = Linear(d, d, dtype, bias=False)
        self.v_proj = Linear(d, d, dtype, bias=False)
        self.out_proj = Linear(d, d, dtype, bias=False)
        self.config = config
        self.dtype = dtype
        self.gpu_loops = gpu_loops

    def forward(self, x: nn.Tensor, rotary: "Rotary", cache: Cache, total: "tirx.PrimExpr | BatchRows"):
        qkv = op.concat([self.q_proj.forward_f32(x), self.k_proj.forward_f32(x), self.v_proj.forward_f32(x)],
                        dim=2)
        q, out = rotary_append(self.config, self.dtype, self.gpu_loops, qkv, rotary, cache, total, ffn_offset=None)
        return self.out_proj.forward_f32(attention(self.config, self.dtype, self.gpu_loops, q, cache, out, total))


class MLP(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str):
        self.fc_in = Linear(config.n_embd, config.d_ff, dtype, bias=True)
        self.fc_out = Linear(config.d_ff, config.n_embd, dtype, bias=True)
        self.dtype = dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # gelu_new in float32: its constants rounded to bfloat16 (0.0447, 0.797) would shift every activation
        hidden = gelu_new(self.fc_in.forward_f32(x))
        return self.fc_out.forward_f32(hidden if self.dtype == F32 else op.astype(hidden, self.dtype))


class Block(nn.Module):
    """The plain parallel residual: h + Attn(LN(h)) + FFN(LN(h)), one LayerNorm, separate projections."""

    def __init__(self, config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None = None):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        self.attn = Attention(config, dtype, gpu_loops)
        self.mlp = MLP(config, dtype)
        self.config = config
        self.dtype = dtype
        self.gpu_loops = gpu_loops

    def forward(self, h: nn.Tensor, rotary: "Rotary", cache: Cache, total: "tirx.PrimExpr | BatchRows") -> nn.Tensor:
        x = self.ln_1(h)
        return self.attn(x, rotary, cache, total) + self.mlp(x) + h


class FusedBlock(nn.Module):
    """The same block with its projections merged (ir.merge_projections puts it in place of Block, and
    weights.py lays the merged weights out):
        x = LN(h);  [q|k|v|f] = x W_in + b_in;  y = h + [Attn(rope(q), rope(k), v) | gelu_new(f)] W_out + b_out
    Five kernels: LayerNorm, the W_in GEMM (+ bias), rotary + cache append + gelu_new, attention, and the W_out
    GEMM (+ bias + residual)."""

    def __init__(self, config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None = None):
        d, ff = config.n_embd, config.d_ff
        self.ln_1 = LayerNorm(d, config.layer_norm_epsilon, dtype)
        self.w_in = Linear(d, 3 * d + ff, dtype, bias=True)
        self.w_out = Linear(d + ff, d, dtype, bias=True)
        self.config = config
        self.dtype = dtype
        self.gpu_loops = gpu_loops

    def forward(self, h: nn.Tensor, rotary: "Rotary", cache: Cache, total: "tirx.PrimExpr | BatchRows") -> nn.Tensor:
        c = self.config
        qkvf = self.w_in.forward_f32(self.ln_1(h))
        q, attn_ffn = rotary_append(c, self.dtype, self.gpu_loops, qkvf, rotary, cache, total, ffn_offset=3 * c.n_embd)
        attn_ffn = attention(c, self.dtype, self.gpu_loops, q, cache, attn_ffn, total)
        return self.w_out.forward_f32(attn_ffn, residual=h)


class Rotary(nn.Module):
    def __init__(self, config: GPTJConfig):
        self.cos = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)
        self.sin = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)


class GPTJ(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str, gpu_loops: gpu_attention.Loops | None = None):
        self.config = config
        self.dtype = dtype
        self.gpu_loops = gpu_loops
        self.wte = nn.Parameter((config.vocab_size, config.n_embd), dtype)
        self.rotary = Rotary(config)
        self.h = nn.ModuleList([Block(config, dtype, gpu_loops) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, dtype, bias=True)  # zero-padded columns

    def _hidden(self, input_ids: nn.Tensor, caches, total: tirx.PrimExpr | BatchRows) -> nn.Tensor:
        h = op.reshape(embed(self.wte, op.reshape(input_ids, (-1,))), (1, input_ids.shape[1], -1))
        h = h if self.dtype == F32 else op.astype(h, F32)  # the residual stream stays float32
        for i, block in enumerate(self.h):
            h = block(h, self.rotary, Cache(caches[2 * i], caches[2 * i + 1]), total)
        return self.ln_f(h)

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        logits = self.lm_head(h)
        return logits if self.dtype == F32 else op.astype(logits, F32)

    def prefill(self, input_ids: nn.Tensor, caches, total_len: tirx.Var):
        return self._logits(last_position(self._hidden(input_ids, caches, total_len)))

    def prefill_all(self, input_ids: nn.Tensor, caches, total_len: tirx.Var):
        return self._logits(self._hidden(input_ids, caches, total_len))

    def decode(self, input_ids: nn.Tensor, caches, total_len: tirx.Var):
        return self._logits(self._hidden(input_ids, caches, total_len))

    def step(self, input_ids: nn.Tensor, slots: nn.Tensor, positions: nn.Tensor, logit_rows: nn.Tensor, caches):
        """One step of the serving engine: tokens of several sequences as the rows of one batch (any mix of
        decode tokens and prefill chunks), each appended to its slot of the slot caches; logits of the rows
        `logit_rows` only (each sequence's last), so a prefill chunk does not pay lm_head for every token."""
        h = self._hidden(input_ids, caches, BatchRows(slots, positions))
        rows = op.wrap_nested(relax.op.take(h._expr, logit_rows._expr, axis=1, mode="clip"), name="logit_rows")
        return self._logits(rows)

    def get_default_spec(self, prefill_buckets: tuple[int, ...] = (), batched: bool = False):
        """The exported functions; each bucket B adds `prefill_B`, prefill of exactly B tokens: static shapes,
        so its kernels can be tuned (schedules/tune.py) and the runtime prefills long prompts in such chunks.
        `batched` adds `step` over slot caches [slots, capacity, n_head, head_dim] (runtime/executors.py)."""
        c = self.config
        cache = nn.spec.Tensor(["cache_len", c.n_head, c.head_dim], self.dtype)  # up to n_positions
        caches = [cache] * (2 * c.n_layer)
        modes = {"param_mode": "packed", "effect_mode": "none"}

        def method(n):
            return {"input_ids": nn.spec.Tensor([1, n], "int32"), "caches": caches, "total_len": int, "$": modes}

        specs = {"prefill": method("seq_len"), "prefill_all": method("seq_len"), "decode": method(1)}
        for bucket in prefill_buckets:
            setattr(self, bucket_function(bucket), self.prefill)  # the spec looks methods up by name
            specs[bucket_function(bucket)] = method(bucket)
        if batched:
            slot_cache = nn.spec.Tensor(["num_slots", "slot_len", c.n_head, c.head_dim], self.dtype)
            specs["step"] = {"input_ids": nn.spec.Tensor([1, "rows"], "int32"),
                                 "slots": nn.spec.Tensor(["rows"], "int32"),
                                 "positions": nn.spec.Tensor(["rows"], "int32"),
                                 "logit_rows": nn.spec.Tensor(["logit_rows"], "int32"),
                                 "caches": [slot_cache] * (2 * c.n_layer), "$": modes}
        functions = {name: specs[name] for name in exported_functions(prefill_buckets, batched)}
        return nn.spec.ModuleSpec.from_raw(functions, self)
