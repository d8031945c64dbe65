"""A user model factory for the torch runtime's ``model = "tests.e2e.tiny_factory:build"`` (tests only).

A TinyLM smaller than the built-in one (one layer, a 64-token context), so a
test can tell from the daemon's answers that this factory's model is the one served.
"""

from __future__ import annotations

from typing import Any

import torch

from inferd.models.tiny import TinyConfig, TinyLM, init_weights

CONFIG = TinyConfig(d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=64)
SEED_OFFSET = 1000  # not the built-in model's weights for the same seed


def build(*, device: torch.device, dtype: torch.dtype, weights: str | None = None, seed: int = 0,
          **_: Any) -> TinyLM:
    model = TinyLM(CONFIG)
    init_weights(model, seed + SEED_OFFSET)
    return model.to(device=device, dtype=dtype).eval()
