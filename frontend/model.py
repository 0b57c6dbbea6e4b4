"""GPT-J as a Relax `nn.Module`: the math of docs/GPTJ-MATH.md, with a KV cache, batch 1.

Weights are stored in the layout the kernels read (see `weights.py` for the map from Hugging Face names):
for the CPU, linear weights are [in_features, out_features] in column tiles (bfloat16: in column pairs,
pair_gemm.py); for GPUs, [out_features, in_features] rows (the `Variant`). No kernel transposes a weight at run
time. Half-precision models keep the residual stream, LayerNorm statistics, rotary angles, softmax and matmul
accumulation in float32; the model dtype is what the weights, the KV cache and the GEMMs' inputs are stored in.

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

from . import gpu_kernels, kernels, pair_gemm, quantization, x86_gemm
from .config import (COLUMN_PAIRS, COLUMN_TILES, GELU_NEW_COEFF, GELU_NEW_SCALE, ROWS, GPTJConfig, linear_layout,
                     pair_tile, weight_tile)

F32 = "float32"


@dataclass(frozen=True)
class Variant:
    """What differs between compiled models: the linear weights' layout, the attention kernels' form (kernels.py's
    CPU kernels, or gpu_kernels.py's thread-block kernels with these loops), and the weights' quantization
    (None, or a scheme of quantization.py: CPUs only) with the instructions its GEMMs use."""
    weight_layout: str = COLUMN_TILES
    gpu_loops: gpu_kernels.Loops | None = None
    quantization: str | None = None
    vnni: bool = False  # quantized GEMMs on AVX-512 VNNI integer dot products (x86_gemm.py)

    def linear(self, in_features: int, out_features: int, dtype: str, bias: bool, scheme: str | None = None):
        scheme = scheme or self.quantization
        if scheme is None:
            return Linear(in_features, out_features, dtype, bias, self.weight_layout)
        return QuantLinear(in_features, out_features, dtype, bias, scheme, self.vnni)


CPU = Variant()
CPU_PAIRS = Variant(COLUMN_PAIRS)  # bfloat16 on CPUs (pair_gemm.py)
GPU = Variant(ROWS, gpu_kernels.Loops(gpu=True))
GPU_ON_CPU = Variant(ROWS, gpu_kernels.Loops(gpu=False))  # the GPU graph, runnable on a CPU: tests its math


class Linear(nn.Module):
    """y = x @ W + bias, accumulated in float32, with W [in, out] stored in column tiles [out / t, in, t]
    (weights.tiled), in column pairs [out / t, in / 2, t, 2] (weights.paired: bfloat16 CPU artifacts; a weight
    that does not pair stays in column tiles) or as [out, in] rows (layout ROWS). Biases are stored in float32:
    they are tiny, and a cast of a weight would run every step."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool, layout: str = COLUMN_TILES):
        layout = linear_layout(layout, in_features, out_features)
        if layout == ROWS:
            self.weight = nn.Parameter((out_features, in_features), dtype)
        elif layout == COLUMN_PAIRS:
            tile = pair_tile(in_features, out_features)
            self.weight = nn.Parameter((out_features // tile, in_features // 2, tile, 2), dtype)
        else:
            tile = weight_tile(out_features)
            self.weight = nn.Parameter((out_features // tile, in_features, tile), dtype)
        self.bias = nn.Parameter((out_features,), F32) if bias else None
        self.dtype = dtype
        self.layout = layout
        self.in_features, self.out_features = in_features, out_features

    def forward_f32(self, x: nn.Tensor, residual: nn.Tensor | None = None) -> nn.Tensor:
        """The float32 result (+ residual, float32), before rounding to the model dtype."""
        if self.layout == COLUMN_PAIRS:  # the kernel adds the bias and the residual as it writes y
            extra = [t for t in (self.bias, residual) if t is not None]
            kernel = pair_gemm.pair_matmul(self.in_features, self.out_features, str(x.dtype),
                                           bias=self.bias is not None, residual=residual is not None)
            return op.tensor_ir_op(kernel, "pair_matmul", [x, self.weight, *extra],
                                   nn.Tensor.placeholder([1, x.shape[1], self.out_features], F32))
        y = rows_matmul(x, self.weight) if self.layout == ROWS else tiled_matmul(x, self.weight)
        return plus_bias_and_residual(y, self.bias, residual)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = self.forward_f32(x)
        return y if self.dtype == F32 else op.astype(y, self.dtype)


def plus_bias_and_residual(y: nn.Tensor, bias: nn.Tensor | None, residual: nn.Tensor | None) -> nn.Tensor:
    """(y + bias) + residual, each where given: the graph's own order, which pair_gemm's write-back keeps."""
    y = y + bias if bias is not None else y
    return y + residual if residual is not None else y


def tiled_matmul(x: nn.Tensor, weight: nn.Tensor) -> nn.Tensor:
    """x [b, n, in] @ W, with W in column tiles [out / t, in, t]; float32 result."""
    tiles, k_extent, tile = (int(s) for s in weight.shape)

    def compute(x: te.Tensor, w: te.Tensor):
        k = te.reduce_axis((0, k_extent), name="k")
        return te.compute(
            (x.shape[0], x.shape[1], tiles * tile),
            lambda b, t, j: te.sum(x[b, t, k].astype(F32) * w[j // tile, k, j % tile].astype(F32), axis=k),
            name="matmul")

    return op.tensor_expr_op(compute, "matmul", [x, weight])


class QuantLinear(nn.Module):
    """Linear with weight-only quantized weights (quantization.py), read once, as stored. With vnni (x86 CPUs
    with AVX-512 VNNI) the input is quantized per group to int8 and the GEMM runs on integer dot products
    (x86_gemm.py); otherwise the levels are widened to float32 and multiplied by x exactly."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool, scheme: str, vnni: bool):
        quantization.check_shape(in_features, out_features)
        tiles, tile = out_features // quantization.TILE, quantization.TILE
        rows = in_features // quantization.FEATURES_PER_ROW[scheme]
        self.weight = nn.Parameter((tiles, rows, tile, 4), "uint8")
        self.scale = nn.Parameter((tiles, in_features // quantization.GROUP, tile), "float16")
        self.bias = nn.Parameter((out_features,), F32) if bias else None
        self.dtype = dtype
        self.scheme = scheme
        self.vnni = vnni
        self.in_features, self.out_features = in_features, out_features

    def forward_f32(self, x: nn.Tensor, residual: nn.Tensor | None = None) -> nn.Tensor:
        """The float32 result (+ residual, float32), before rounding to the model dtype."""
        if self.vnni:
            x_q, x_scale, x_sum = quantize_activations(x)
            kernel = x86_gemm.vnni_matmul(self.in_features, self.out_features, self.scheme)
            y = op.tensor_ir_op(kernel, "vnni_matmul", [x_q, x_scale, x_sum, self.weight, self.scale],
                                nn.Tensor.placeholder([1, x.shape[1], self.out_features], F32))
        else:
            y = quantized_matmul(x, self.weight, self.scale, self.scheme)
        return plus_bias_and_residual(y, self.bias, residual)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = self.forward_f32(x)
        return y if self.dtype == F32 else op.astype(y, self.dtype)


def quantize_activations(x: nn.Tensor):
    """x [1, n, K] -> (x_q int8, x_scale float32 [1, n, K / GROUP], x_sum int32 [1, n, K / GROUP]): per group of
    GROUP features, x_scale = max |x| / 127 (1 for an all-zero group), x_q = round half even(x / x_scale)."""
    group = quantization.GROUP

    def compute(x: te.Tensor):
        b, n, k = x.shape
        ki = te.reduce_axis((0, group), name="ki")
        amax = te.compute((b, n, k // group),
                          lambda i, t, g: te.max(te.abs(x[i, t, g * group + ki].astype(F32)), axis=ki), name="amax")
        scale = te.compute(amax.shape, lambda i, t, g: tirx.Select(
            amax[i, t, g] > 0, amax[i, t, g] / tirx.const(127.0, F32), tirx.const(1.0, F32)), name="x_scale")
        x_q = te.compute(x.shape, lambda i, t, j: tirx.nearbyint(
            x[i, t, j].astype(F32) / scale[i, t, j // group]).astype("int8"), name="x_q")
        kj = te.reduce_axis((0, group), name="kj")
        x_sum = te.compute(amax.shape, lambda i, t, g: te.sum(x_q[i, t, g * group + kj].astype("int32"), axis=kj),
                           name="x_sum")
        return [x_q, scale, x_sum]

    return op.tensor_expr_op(compute, "quantize_activations", [x])


def quantized_matmul(x: nn.Tensor, weight: nn.Tensor, scale: nn.Tensor, scheme: str) -> nn.Tensor:
    """x [b, n, in] @ W' with W' = levels x scale per group of input features; float32 result. Two reductions:
    each group's sum of x times the integer levels, then the groups' sums times their scales (the scale
    multiplies once per group, not per weight). schedules/cpu_quant.py keeps both in registers."""
    tiles, _, tile, _ = (int(s) for s in weight.shape)
    group, groups = quantization.GROUP, int(scale.shape[1])
    offset = tirx.const(float(quantization.OFFSET[scheme]), F32)

    def level(w: te.Tensor, j, k):
        if scheme == "q8":
            return w[j // tile, k // 4, j % tile, k % 4].astype(F32) - offset
        byte = w[j // tile, k // 8, j % tile, k % 4]
        nibble = (byte >> (k % 8 // 4 * 4).astype("uint8")) & tirx.const(15, "uint8")
        return nibble.astype(F32) - offset

    def compute(x: te.Tensor, w: te.Tensor, s: te.Tensor):
        ki = te.reduce_axis((0, group), name="ki")
        partial = te.compute(
            (x.shape[0], x.shape[1], groups, tiles * tile),
            lambda b, t, g, j: te.sum(x[b, t, g * group + ki].astype(F32) * level(w, j, g * group + ki), axis=ki),
            name="group_sum")
        gi = te.reduce_axis((0, groups), name="g")
        return te.compute(
            (x.shape[0], x.shape[1], tiles * tile),
            lambda b, t, j: te.sum(partial[b, t, gi, j] * s[j // tile, gi, j % tile].astype(F32), axis=gi),
            name="matmul")

    return op.tensor_expr_op(compute, "quantized_matmul", [x, weight, scale])


def rows_matmul(x: nn.Tensor, weight: nn.Tensor) -> nn.Tensor:
    """x [b, n, in] @ W^T, with W [out, in]; float32 result."""
    out_extent, k_extent = (int(s) for s in weight.shape)

    def compute(x: te.Tensor, w: te.Tensor):
        k = te.reduce_axis((0, k_extent), name="k")
        return te.compute((x.shape[0], x.shape[1], out_extent),
                          lambda b, t, j: te.sum(x[b, t, k].astype(F32) * w[j, k].astype(F32), axis=k),
                          name="matmul")

    return op.tensor_expr_op(compute, "matmul", [x, weight])


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


def rotary_append(config: GPTJConfig, dtype: str, variant: Variant, qkv: nn.Tensor, rotary: "Rotary",
                  cache: Cache, total: tirx.PrimExpr, ffn_offset: int | None) -> tuple[nn.Tensor, nn.Tensor]:
    """Rotates q and k, appends k and v to the cache (one kernel); with ffn_offset, also gelu_new of the FFN
    columns into out[:, :, d:]. Returns q and out [1, n, d (+ d_ff)]."""
    _, n, width = qkv.shape
    out_width = config.n_embd + (config.d_ff if ffn_offset is not None else 0)
    if variant.gpu_loops is None:
        kernel = kernels.rotary_append(config, dtype, int(width), ffn_offset)
    else:
        kernel = gpu_kernels.rotary_append(config, dtype, int(width), ffn_offset, variant.gpu_loops)
    keys, values, q, out = op.tensor_ir_inplace_op(
        kernel, "rotary_append",
        [qkv, rotary.cos, rotary.sin, cache.keys, cache.values, total],
        [3, 4, -1, -1],
        [nn.Tensor.placeholder(cache.keys.shape, dtype)] * 2
        + [nn.Tensor.placeholder([1, n, config.n_head, config.head_dim], dtype),
           nn.Tensor.placeholder([1, n, out_width], dtype)])
    cache.keys, cache.values = keys, values
    return q, out


def attention(config: GPTJConfig, dtype: str, variant: Variant, q: nn.Tensor, cache: Cache, out: nn.Tensor,
              total: tirx.PrimExpr) -> nn.Tensor:
    """Causal attention of q over the cache, written into out[:, :, :n_embd] (in place)."""
    width = int(out.shape[2])
    if variant.gpu_loops is None:
        kernel = kernels.attention(config, dtype, width)
    else:
        kernel = gpu_kernels.attention(config, dtype, width, variant.gpu_loops)
    return op.tensor_ir_inplace_op(
        kernel, "attention",
        [q, cache.keys, cache.values, out, total], [3], nn.Tensor.placeholder(out.shape, dtype))


class Attention(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str, variant: Variant):
        d = config.n_embd
        self.q_proj = variant.linear(d, d, dtype, bias=False)
        self.k_proj = variant.linear(d, d, dtype, bias=False)
        self.v_proj = variant.linear(d, d, dtype, bias=False)
        self.out_proj = variant.linear(d, d, dtype, bias=False)
        self.config = config
        self.dtype = dtype
        self.variant = variant

    def forward(self, x: nn.Tensor, rotary: "Rotary", cache: Cache, total: tirx.PrimExpr):
        qkv = op.concat([self.q_proj.forward_f32(x), self.k_proj.forward_f32(x), self.v_proj.forward_f32(x)],
                        dim=2)
        q, out = rotary_append(self.config, self.dtype, self.variant, qkv, rotary, cache, total, ffn_offset=None)
        return self.out_proj.forward_f32(attention(self.config, self.dtype, self.variant, q, cache, out, total))


class MLP(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str, variant: Variant):
        self.fc_in = variant.linear(config.n_embd, config.d_ff, dtype, bias=True)
        self.fc_out = variant.linear(config.d_ff, config.n_embd, dtype, bias=True)
        self.dtype = dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # gelu_new in float32: its constants rounded to bfloat16 (0.0447, 0.797) would shift every activation
        hidden = gelu_new(self.fc_in.forward_f32(x))
        return self.fc_out.forward_f32(hidden if self.dtype == F32 else op.astype(hidden, self.dtype))


class Block(nn.Module):
    """The plain parallel residual: h + Attn(LN(h)) + FFN(LN(h)), one LayerNorm, separate projections."""

    def __init__(self, config: GPTJConfig, dtype: str, variant: Variant = CPU):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        self.attn = Attention(config, dtype, variant)
        self.mlp = MLP(config, dtype, variant)
        self.config = config
        self.dtype = dtype
        self.variant = variant

    def forward(self, h: nn.Tensor, rotary: "Rotary", cache: Cache, total: tirx.PrimExpr) -> nn.Tensor:
        x = self.ln_1(h)
        return self.attn(x, rotary, cache, total) + self.mlp(x) + h


class FusedBlock(nn.Module):
    """The same block with its projections merged (ir.merge_projections puts it in place of Block, and
    weights.py lays the merged weights out):
        x = LN(h);  [q|k|v|f] = x W_in + b_in;  y = h + [Attn(rope(q), rope(k), v) | gelu_new(f)] W_out + b_out
    Five kernels: LayerNorm, the W_in GEMM (+ bias), rotary + cache append + gelu_new, attention, and the W_out
    GEMM (+ bias + residual)."""

    def __init__(self, config: GPTJConfig, dtype: str, variant: Variant = CPU):
        d, ff = config.n_embd, config.d_ff
        self.ln_1 = LayerNorm(d, config.layer_norm_epsilon, dtype)
        self.w_in = variant.linear(d, 3 * d + ff, dtype, bias=True)
        self.w_out = variant.linear(d + ff, d, dtype, bias=True)
        self.config = config
        self.dtype = dtype
        self.variant = variant

    def forward(self, h: nn.Tensor, rotary: "Rotary", cache: Cache, total: tirx.PrimExpr) -> nn.Tensor:
        c = self.config
        qkvf = self.w_in.forward_f32(self.ln_1(h))
        q, attn_ffn = rotary_append(c, self.dtype, self.variant, qkvf, rotary, cache, total, ffn_offset=3 * c.n_embd)
        attn_ffn = attention(c, self.dtype, self.variant, q, cache, attn_ffn, total)
        return self.w_out.forward_f32(attn_ffn, residual=h)


class Rotary(nn.Module):
    def __init__(self, config: GPTJConfig):
        self.cos = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)
        self.sin = nn.Parameter((config.n_positions, config.rotary_dim // 2), F32)


class GPTJ(nn.Module):
    def __init__(self, config: GPTJConfig, dtype: str, variant: Variant = CPU):
        self.config = config
        self.dtype = dtype
        self.variant = variant
        self.wte = nn.Parameter((config.vocab_size, config.n_embd), dtype)
        self.rotary = Rotary(config)
        self.h = nn.ModuleList([Block(config, dtype, variant) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype)
        # zero-padded columns; q8 when the blocks are quantized at all (quantization.LM_HEAD)
        self.lm_head = variant.linear(config.n_embd, config.padded_vocab_size, dtype, bias=True,
                                      scheme=quantization.LM_HEAD if variant.quantization else None)

    def _hidden(self, input_ids: nn.Tensor, caches, total: tirx.PrimExpr) -> nn.Tensor:
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

    def get_default_spec(self, prefill_buckets: tuple[int, ...] = ()):
        """The exported functions; each bucket B adds `prefill_B`, prefill of exactly B tokens: static shapes,
        so its kernels can be tuned (schedules/tune.py) and the runtime prefills long prompts in such chunks."""
        c = self.config
        cache = nn.spec.Tensor(["cache_len", c.n_head, c.head_dim], self.dtype)  # up to n_positions
        caches = [cache] * (2 * c.n_layer)
        modes = {"param_mode": "packed", "effect_mode": "none"}

        def method(n):
            return {"input_ids": nn.spec.Tensor([1, n], "int32"), "caches": caches, "total_len": int, "$": modes}

        functions = {"prefill": method("seq_len"), "prefill_all": method("seq_len"), "decode": method(1)}
        for bucket in prefill_buckets:
            setattr(self, bucket_function(bucket), self.prefill)  # the spec looks methods up by name
            functions[bucket_function(bucket)] = method(bucket)
        return nn.spec.ModuleSpec.from_raw(functions, self)


def bucket_function(bucket: int) -> str:
    return f"prefill_{bucket}"
