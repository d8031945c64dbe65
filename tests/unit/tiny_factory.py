"""Model factories for the torch runtime's tests (``model = "tests.unit.tiny_factory:build_small"``).

Also the shared helpers of the torch tests: the small model's dimensions, a writer for
weights files through the real ``python -m inferd.models.tiny`` command, and a greedy
generator written directly against the :class:`~inferd.models.interface.CausalLM` methods.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from inferd.models import tiny  # noqa: E402

# A model small enough that a decode step takes about a millisecond on two CPU cores.
SMALL = {"d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": 128, "max_seq_len": 64}

NOT_CALLABLE = 42


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count, restored after. The tests run with one thread, which keeps
    them fast on a shared two-core machine (two OpenMP threads slow down by 30x when another
    process holds a core); those about batch invariance run with two, as a worker does."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_config(**overrides: int) -> tiny.TinyConfig:
    return tiny.TinyConfig(**{**SMALL, **overrides})


def seeded_small(seed: int, **overrides: int) -> tiny.TinyLM:
    model = tiny.TinyLM(small_config(**overrides))
    tiny.init_weights(model, seed)
    return model.eval()


def build_small(*, device: torch.device, dtype: torch.dtype, weights: str | None = None, seed: int = 0,
                **_: Any) -> tiny.TinyLM:
    """A factory with the interface's signature: the small model, seeded (weights are ignored)."""
    return seeded_small(seed).to(device=device, dtype=dtype)


# A near tie: seeded_small(4) with the output bias of "." raised until, for NEAR_TIE_PROMPT, its
# logit at one greedy step is within about 1e-6 of the winner's. Found by search on this project's
# two-core x86 machines; elsewhere the tie may fall on the same side in every slot.
NEAR_TIE_PROMPT = "Hello, tiny model"
NEAR_TIE_BIAS = (ord("."), -4.026290624624634)


def build_near_tie(*, device: torch.device, dtype: torch.dtype, **_: Any) -> tiny.TinyLM:
    model = seeded_small(4)
    with torch.no_grad():
        model.head_bias[NEAR_TIE_BIAS[0]] = NEAR_TIE_BIAS[1]
    return model.to(device=device, dtype=dtype)


def build_not_a_model(**_: Any) -> object:
    """A factory whose result has none of the CausalLM interface."""
    return object()


def tool_args(path: str, seed: int, **overrides: int) -> list[str]:
    """The command line of ``python -m inferd.models.tiny`` for the small model's dimensions."""
    dims = {**SMALL, **overrides}
    return [path, "--seed", str(seed), "--d-model", str(dims["d_model"]), "--layers", str(dims["n_layers"]),
            "--heads", str(dims["n_heads"]), "--d-ff", str(dims["d_ff"]), "--max-seq-len", str(dims["max_seq_len"])]


def write_with_tool(path: str, seed: int, **overrides: int) -> str:
    """Write a weights file with the real click command (in process)."""
    tiny.main(tool_args(path, seed, **overrides), standalone_mode=False)
    return path


def greedy(model: Any, prompt: str, count: int, slots: int = 1, slot: int = 0) -> list[int]:
    """``count`` greedy tokens for ``prompt``, alone in ``slot`` of a fresh ``slots``-slot cache."""
    cache = model.new_cache(slots)
    ids = model.tokenizer.encode(prompt)
    token = int(torch.argmax(model.prefill(torch.tensor(ids), cache, slot)))
    out = [token]
    tokens = torch.zeros(slots, dtype=torch.long)
    positions = torch.zeros(slots, dtype=torch.long)
    position = len(ids)
    while len(out) < count and position < model.max_seq_len:
        tokens[slot], positions[slot] = token, position
        token = int(torch.argmax(model.decode(tokens, positions, cache)[slot]))
        out.append(token)
        position += 1
    return out
