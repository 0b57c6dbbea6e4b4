"""GPT-J's configuration, read from a Hugging Face `config.json`, and the numbers that define GPT-J.

The keys and their meanings are those of docs/GPTJ-MATH.md. Every number that defines GPT-J beyond the config
(LayerNorm eps default, rotary base, gelu_new's constants) is named once, in core/constants.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from gptj_tvm.core.constants import DEFAULT_LAYER_NORM_EPS, ROTARY_BASE
from gptj_tvm.core.errors import GptjError

# prompt lengths that get a static `prefill_B` by default (compile, on CPUs) and whose GEMMs `tune` tunes
PREFILL_BUCKETS = (32, 128)

DTYPES = ("float32", "float16", "bfloat16")


def bucket_function(bucket: int) -> str:
    return f"prefill_{bucket}"


def exported_functions(prefill_buckets=(), batched: bool = False) -> list[str]:
    """What a compiled artifact exports, in order: prefill (any length), prefill_all (logits at every position),
    decode (one token), a static prefill per bucket, and with `batched` the engine's step over slot caches."""
    return ["prefill", "prefill_all", "decode", *(bucket_function(b) for b in prefill_buckets),
            *(["step"] if batched else [])]
# lm_head's columns are padded with zeros to a multiple of this, so its GEMV splits into even, wide strips.
LM_HEAD_PAD = 512
@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64
    n_inner: int | None = None
    layer_norm_epsilon: float = DEFAULT_LAYER_NORM_EPS
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    torch_dtype: str | None = "float32"  # None: the config names none (compile uses the weights' dtype)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_values_per_position(self) -> int:
        """Keys and values of every layer for one token: what a KV cache holds per position."""
        return 2 * self.n_layer * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // LM_HEAD_PAD) * LM_HEAD_PAD

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> "GPTJConfig":
        def need(ok: bool, what: str):
            if not ok:
                raise GptjError(f"config.json: {what}")

        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, f"{key} must be a positive integer, got {value!r}")
        need(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        # transformers slices the head to rotary_dim and multiplies by rotary_dim angles: larger than the head,
        # the shapes do not broadcast and its forward fails
        need(self.rotary_dim <= self.head_dim, f"rotary_dim {self.rotary_dim} is larger than the head "
             f"(n_embd / n_head = {self.head_dim}); transformers cannot run this config either")
        need(self.rotary_dim % 2 == 0, f"rotary_dim {self.rotary_dim} must be even")
        need(isinstance(self.d_ff, int) and self.d_ff > 0, "n_inner must be null or a positive integer")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            need(value is None or isinstance(value, int), f"{key} must be an integer or null, got {value!r}")
        need(self.torch_dtype is None or self.torch_dtype in DTYPES,
             f"dtype {self.torch_dtype!r} is not one of {', '.join(DTYPES)}")
        return self

    def warnings(self) -> list[str]:
        """What transformers accepts with a warning: an eos the model cannot output (generation then ends at
        the length limit or another stop id)."""
        eos = self.eos_token_id
        if eos is not None and not 0 <= eos < self.vocab_size:
            return [f"eos_token_id {eos} is outside the vocab ({self.vocab_size} tokens): that token never comes out"]
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "GPTJConfig":
        if raw.get("model_type") not in (None, "gptj"):
            raise GptjError(f"config.json: model_type is {raw.get('model_type')!r}, not 'gptj'")
        activation = raw.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise GptjError(f"config.json: activation_function {activation!r} is not supported (GPT-J uses gelu_new)")
        if raw.get("tie_word_embeddings", False):
            raise GptjError("config.json: tie_word_embeddings is true, but GPT-J's lm_head is its own tensor")
        fields = {f.name for f in dataclasses.fields(cls)}
        # keys transformers does not use for GPT-J (`rotary`, `task_specific_params`, BERT-style keys in tiny
        # test configs) are ignored, as it ignores them
        known = {k: v for k, v in raw.items() if k in fields and k != "torch_dtype"}
        if known.get("rotary_dim", 0) is None:  # transformers rotates the whole head
            known["rotary_dim"] = int(raw["n_embd"]) // int(raw["n_head"])
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        return cls(**known, torch_dtype=str(dtype) if dtype else None).validate()

    @classmethod
    def from_file(cls, path: Path) -> "GPTJConfig":
        path = Path(path)
        if not path.is_file():
            raise GptjError(f"{path}: no such file (a GPT-J checkpoint needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GptjError(f"{path}: not a readable JSON file ({err})") from None
        if not isinstance(raw, dict) or "n_embd" not in raw or "n_layer" not in raw:
            raise GptjError(f"{path}: not a GPT-J config (needs model_type 'gptj', n_embd, n_layer, ...)")
        try:
            return cls.from_dict(raw)
        except TypeError as err:
            raise GptjError(f"{path}: {err}") from None

    def to_hf_dict(self) -> dict:
        """The config.json a Hugging Face GPT-J checkpoint carries."""
        return {
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "activation_function": "gelu_new",
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            **({"torch_dtype": self.torch_dtype} if self.torch_dtype else {}),
        }


def rotary_tables(config: GPTJConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of p * 10000^(-2i / rotary_dim), [n_positions, rotary_dim / 2], computed in float32
    exactly as Hugging Face's GPT-J does (int exponents divided in float32, then a float32 outer product)."""
    exponents = np.arange(0, config.rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(config.rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(ROTARY_BASE), exponents)).astype(np.float32)
    angles = np.outer(np.arange(config.n_positions, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


PRESETS = {
    "tiny": GPTJConfig(vocab_size=50400, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gptj-6b": GPTJConfig(torch_dtype="bfloat16"),
}
