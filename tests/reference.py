"""An independent GPT-J in numpy, written from docs/GPTJ-MATH.md (not from the code under test).

It reads the Hugging Face checkpoint itself (config.json and the weight files, HF names, [out, in]
weights) and computes in float64 from the checkpoint's values (half-precision weights are widened exactly).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors import safe_open


def load_checkpoint(model_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json and every weight as float64: safetensors through safetensors, pytorch_model*.bin through
    torch.load (torch is the independent reader of its own format)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    weights = {}
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (model_dir / index).exists():
            files = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
        elif (model_dir / single).exists():
            files = [single]
        else:
            continue
        for name in files:
            if name.endswith(".bin"):
                import torch  # only the .bin fixtures need it

                for key, tensor in torch.load(model_dir / name, weights_only=True).items():
                    weights[key] = tensor.to(torch.float64).numpy()
                continue
            with safe_open(str(model_dir / name), framework="np") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key).astype(np.float64)
        break
    return config, weights


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased variance
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotate_every_two(x, positions, rotary_dim):
    """x [T, heads, head_dim]; the interleaved GPT-J rotary on the first rotary_dim dims of each head."""
    out = x.copy()
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv = (1.0 / (10000.0 ** exponents)).astype(np.float32)
    theta = (positions.astype(np.float32)[:, None] * inv[None, :]).astype(np.float32)  # float32, as the math says
    cos, sin = np.cos(theta).astype(np.float64)[:, None, :], np.sin(theta).astype(np.float64)[:, None, :]
    even, odd = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    out[..., 0:rotary_dim:2] = even * cos - odd * sin
    out[..., 1:rotary_dim:2] = odd * cos + even * sin
    return out


class ReferenceGPTJ:
    def __init__(self, model_dir):
        self.config, self.w = load_checkpoint(model_dir)
        c = self.config
        self.n_head = c["n_head"]
        self.head_dim = c["n_embd"] // c["n_head"]
        self.eps = c.get("layer_norm_epsilon", 1e-5)

    def logits(self, ids) -> np.ndarray:
        """Logits [T, vocab] at every position of ids (a fresh sequence)."""
        c, w = self.config, self.w
        T = len(ids)
        h = w["transformer.wte.weight"][np.asarray(ids)]
        positions = np.arange(T)
        mask = np.tril(np.ones((T, T), dtype=bool))
        for i in range(c["n_layer"]):
            p = f"transformer.h.{i}."
            x = layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
            q = self.project(x, p + "attn.q_proj.weight").reshape(T, self.n_head, self.head_dim)
            k = self.project(x, p + "attn.k_proj.weight").reshape(T, self.n_head, self.head_dim)
            v = self.project(x, p + "attn.v_proj.weight").reshape(T, self.n_head, self.head_dim)
            q = rotate_every_two(q, positions, c["rotary_dim"])
            k = rotate_every_two(k, positions, c["rotary_dim"])
            scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(self.head_dim)
            scores = np.where(mask[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            attn = self.project(np.einsum("hts,shd->thd", probs, v).reshape(T, -1), p + "attn.out_proj.weight")
            ffn = gelu_new(self.project(x, p + "mlp.fc_in.weight") + w[p + "mlp.fc_in.bias"])
            ffn = self.project(ffn, p + "mlp.fc_out.weight") + w[p + "mlp.fc_out.bias"]
            h = h + attn + ffn
        h = layer_norm(h, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], self.eps)
        return self.project(h, "lm_head.weight") + w["lm_head.bias"]

    def project(self, x: np.ndarray, weight: str) -> np.ndarray:
        """x @ W^T for the HF linear weight named weight ([out, in])."""
        return x @ self.w[weight].T

    def greedy(self, ids, n: int) -> list[int]:
        ids = list(ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(self.logits(ids)[-1]))
            out.append(token)
            ids.append(token)
        return out


def rel_max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
