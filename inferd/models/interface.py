"""What the torch runtime needs from a model: a tokenizer and a slot-based KV cache.

A model factory (``model = "package.module:callable"`` in a deployment's
options) is called once per load, in the worker, after its device is pinned::

    factory(device=torch.device, dtype=torch.dtype, weights=str | None, seed=int) -> CausalLM

The runtime owns scheduling; the model owns arithmetic. The cache has a
fixed number of slots (the batch size) and a fixed length (``max_seq_len``),
and :meth:`CausalLM.decode` runs over every slot: no computation a request
takes part in may depend on which other requests share the step, so a
request's output does not either (see ``docs/architecture.md``, "Batch
invariance").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Tokenizer(Protocol):
    eos_id: int | None    # the token that ends a sequence; None if the model has none
    # Optional: ``eos_ids`` (every token that ends a sequence, when there are several), and
    # ``has_chat_template`` with ``encode_chat(messages) -> list[int]`` (a chat's prompt tokens).

    def encode(self, text: str) -> list[int]:
        """The prompt's tokens, including any start-of-sequence token."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token stands for (b"" for special tokens). Text is
        decoded from bytes incrementally, so a token may end mid-character."""


class CausalLM(Protocol):
    tokenizer: Tokenizer
    max_seq_len: int      # prompt and generated tokens together
    vocab_size: int

    def new_cache(self, slots: int) -> Any:
        """A KV cache of ``slots`` sequences of ``max_seq_len`` tokens, on the model's device."""

    def prefill(self, tokens: "torch.Tensor", cache: Any, slot: int) -> "torch.Tensor":
        """Run a prompt (``[L]`` token ids) into ``slot``; the logits ``[vocab]`` of its last position."""

    def decode(self, tokens: "torch.Tensor", positions: "torch.Tensor", cache: Any,
               live: list[int] | None = None) -> "torch.Tensor":
        """One token for every slot (``[slots]`` ids at ``[slots]`` positions); logits ``[slots, vocab]``.
        A row's result must depend only on that slot's tokens and cache. ``live`` names the slots
        whose rows matter (None: all); a model may skip work for the others."""
