"""The numbers that define GPT-J beyond its config.json (docs/GPTJ-MATH.md), named once: the model reads them
through frontend/config.py, the hand-written kernels (tir_kernels/) from here."""

from __future__ import annotations

import math

ROTARY_BASE = 10000.0
GELU_NEW_COEFF = 0.044715
GELU_NEW_SCALE = math.sqrt(2.0 / math.pi)
DEFAULT_LAYER_NORM_EPS = 1e-5
