"""Choosing the next token from float32 logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import numpy as np


def next_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0) -> int:
    """temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
