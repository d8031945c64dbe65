"""``tiny``: a small decoder-only transformer with a byte-level tokenizer and a KV cache.

It is the torch runtime's built-in model: real torch compute, small enough to
generate quickly on two CPU cores, with no file to download. Its weights come
from a seed (the same seed gives the same weights on every machine: they are
drawn on the CPU) or from a weights file that :func:`main` writes::

    python -m inferd.models.tiny weights.safetensors --seed 7 --layers 2

The architecture is GPT-2's, shrunk: learned positions, pre-norm blocks,
tied input and output embeddings, plus an output bias. Seeded weights are
untrained, so the text is meaningless; the output bias starts as a prior
over English characters, so it is at least printable (random bytes would
include terminal escape sequences). The cache is slot-based (see
:mod:`inferd.models.interface`): the linear layers of a decode step run over
every slot, and each slot attends over its whole fixed-length cache with a
mask, so neither padding nor the other slots' lengths change a sequence's
arithmetic. Attention runs over the slots up to the highest live one only:
slots are taken lowest first, so a lightly loaded batch reads little cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import nn

from inferd.failures import UnrecoverableError
from inferd.models import weights as weights_io
from inferd.models.bytetok import VOCAB_SIZE, ByteTokenizer

MODEL_KEY = "inferd.model"
CONFIG_KEY = "inferd.tiny.config"

# Relative frequencies of characters in English text: the untrained model's output prior.
ENGLISH = {" ": 18.0, "e": 10.2, "t": 7.5, "a": 6.5, "o": 6.2, "i": 5.7, "n": 5.7, "s": 5.3, "h": 5.0, "r": 5.0,
           "d": 3.5, "l": 3.3, "u": 2.3, "c": 2.2, "m": 2.0, "w": 1.9, "f": 1.8, "g": 1.6, "y": 1.6, "p": 1.5,
           "b": 1.2, ",": 1.0, ".": 1.0, "v": 0.8, "k": 0.6, "\n": 0.5, "j": 0.15, "x": 0.15, "q": 0.1, "z": 0.07}
# GPT-2 draws weights with std 0.02; an untrained model that small ignores its prompt
# and repeats one byte. At 0.3 its output varies with the prompt.
INIT_STD = 0.3


@dataclass(frozen=True)
class TinyConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 256
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")

    def metadata(self) -> dict[str, str]:
        return {MODEL_KEY: "tiny", CONFIG_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> "TinyConfig":
        if metadata.get(MODEL_KEY) != "tiny" or CONFIG_KEY not in metadata:
            raise UnrecoverableError(f"weights file {source}: not a tiny model (no {CONFIG_KEY!r} metadata; "
                                     "write one with `python -m inferd.models.tiny`)")
        try:
            return cls(**json.loads(metadata[CONFIG_KEY]))
        except (ValueError, TypeError) as exc:
            raise UnrecoverableError(f"weights file {source}: bad model config: {exc}") from exc


class KVCache:
    """Keys and values ``[layers, slots, heads, max_seq_len, head_dim]``, plus index helpers."""

    def __init__(self, cfg: TinyConfig, slots: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layers, slots, cfg.n_heads, cfg.max_seq_len, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = torch.arange(slots, device=device)
        self.span = torch.arange(cfg.max_seq_len, device=device)


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.n_heads
        self.scale = (d // cfg.n_heads) ** -0.5
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, d)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[n, d]`` -> q, k, v, each ``[heads, n, head_dim]``."""
        n = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).view(n, 3, self.heads, -1).permute(1, 2, 0, 3).unbind(0)
        return q, k, v

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def prefill(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._qkv(x)
        k_cache[slot, :, :n] = k
        v_cache[slot, :, :n] = v
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # [heads, n, head_dim]
        return self._mlp(x + self.proj(att.transpose(0, 1).reshape(n, -1)))

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int, positions: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """``mask``: ``[n, 1, 1, T]`` for slots ``0..n-1``, the only ones that attend."""
        s, n = x.shape[0], mask.shape[0]
        q, k, v = self._qkv(x)
        k_cache, v_cache = cache.k[layer], cache.v[layer]                      # [slots, heads, T, head_dim]
        k_cache[cache.slots, :, positions] = k.transpose(0, 1)
        v_cache[cache.slots, :, positions] = v.transpose(0, 1)
        # Plain batched matmuls, not scaled_dot_product_attention: its fused CPU kernel splits
        # the slots among threads and rounds a slot differently depending on which thread it
        # falls to, and fused GPU kernels split the cache by batch size (flash-decoding).
        # A batched matmul computes each slot on its own, the same way whatever n is.
        q = q.transpose(0, 1)[:n].unsqueeze(2)                                 # [n, heads, 1, head_dim]
        scores = q @ k_cache[:n].transpose(-1, -2) * self.scale                # [n, heads, 1, T]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), -1).to(v_cache.dtype)
        out = x.new_zeros(s, x.shape[1])
        out[:n] = (weights @ v_cache[:n]).reshape(n, -1)
        return self._mlp(x + self.proj(out))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = ByteTokenizer()
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.tok.weight, self.head_bias).float()  # tied output embedding

    @torch.inference_mode()
    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.cfg, slots, self.tok.weight.device, self.tok.weight.dtype)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        n = tokens.shape[0]
        x = self.tok(tokens) + self.pos.weight[:n]
        for i, block in enumerate(self.blocks):
            x = block.prefill(x, cache.k[i], cache.v[i], slot)
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               live: list[int] | None = None) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(positions)
        # Slots up to the highest live one attend, each over the whole fixed-length cache,
        # masked past its own position.
        n = tokens.shape[0] if live is None else max(live, default=-1) + 1
        mask = (cache.span <= positions[:n, None]).view(n, 1, 1, len(cache.span))
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache, i, positions, mask)
        return self._logits(x)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_weights(model: TinyLM, seed: int) -> None:
    """Random weights drawn on the CPU from ``seed`` in a fixed order, and the English output prior."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name == "head_bias":
                param.fill_(-30.0)  # bytes outside the prior (and end of sequence): practically never
                for char, share in ENGLISH.items():
                    param[ord(char)] = math.log(share / 100)
            elif name.endswith("bias"):
                param.zero_()
            elif ".ln" in name or name.startswith("norm."):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)


def load_weights(model: TinyLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a file's tensors in, refusing any missing, unexpected, misshapen or non-finite one."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UnrecoverableError(f"weights file {source}: does not match the model: "
                                 f"missing {missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UnrecoverableError(f"weights file {source}: {name} has shape {tuple(tensor.shape)}, "
                                     f"the model needs {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise UnrecoverableError(f"weights file {source}: {name} is not finite floating point")
    model.load_state_dict(tensors)


def build(*, device: torch.device, dtype: torch.dtype, weights: str | None = None, seed: int = 0,
          **_: Any) -> TinyLM:
    """The model factory the torch runtime calls for ``model = "tiny"``."""
    if weights:
        tensors, metadata = weights_io.read(weights)
        model = TinyLM(TinyConfig.from_metadata(metadata, weights))
        load_weights(model, tensors, weights)
    else:
        model = TinyLM(TinyConfig())
        init_weights(model, seed)
    return model.to(device=device, dtype=dtype).eval()


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True, help="Initialization seed.")
@click.option("--d-model", default=TinyConfig.d_model, show_default=True)
@click.option("--layers", "n_layers", default=TinyConfig.n_layers, show_default=True)
@click.option("--heads", "n_heads", default=TinyConfig.n_heads, show_default=True)
@click.option("--d-ff", default=TinyConfig.d_ff, show_default=True)
@click.option("--max-seq-len", default=TinyConfig.max_seq_len, show_default=True)
def main(path: str, seed: int, **dims: int) -> None:
    """Write a tiny model's weights to PATH (.safetensors, or .pt/.pth for a torch state_dict)."""
    try:
        cfg = TinyConfig(**dims)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    model = TinyLM(cfg)
    init_weights(model, seed)
    try:
        weights_io.write(path, model.state_dict(), cfg.metadata())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PATH") from exc
    click.echo(f"wrote {path}: tiny model, {model.parameter_count() / 1e6:.2f} M parameters, seed {seed}")


if __name__ == "__main__":
    main()
