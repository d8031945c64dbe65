"""The torch runtime: a causal LM served with continuous (iteration-level) batching.

Scheduling, as in Orca and vLLM: the runner holds up to ``max_batch_size``
sequences, one per slot of the model's KV cache. Each :meth:`TorchRunner.step`

1. prefills requests admitted since the last step into free slots (each
   yields its first token), at most ``max_prefill_tokens`` prompt tokens of
   them (at least one prompt) so that joiners do not stall the running, then
2. runs one decode step over every slot that was already generating,

so every live request gets exactly one token per step. A finished, cancelled
or failed sequence frees its slot at once, and a request admitted meanwhile
takes it at the next step. When the runner is idle, the first request waits
up to ``max_batch_delay_ms`` for others to fill the batch. The worker's
credits are its slots, so requests beyond them wait in the broker's queue.

This module imports torch; only a worker imports it, after its device is
pinned through CUDA_VISIBLE_DEVICES (see :mod:`inferd.worker.process`).
"""

from __future__ import annotations

import collections
import gc
import importlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from inferd.chat import render_plain
from inferd.errors import ErrorCode
from inferd.failures import ContextPoisonedError, UnrecoverableError
from inferd.models.interface import CausalLM
from inferd.protocol import FINISH_LENGTH, FINISH_STOP
from inferd.runtimes import TORCH_MODELS
from inferd.runtimes.base import ModelRunner, Output, RequestRejected, RunRequest
from inferd.runtimes.textstream import TextStream

log = logging.getLogger("inferd.worker")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_TOKENS = 128
DEFAULT_BATCH_DELAY_MS = 2
DEFAULT_PREFILL_TOKENS = 2048


def default_cpu_threads() -> int:
    """torch's threads on a CPU device unless ``cpu_threads`` says otherwise: every core this
    process may use but one. The broker, this worker's I/O thread and local clients need a core,
    and torch's threads wait for each other at every op, so one preempted thread stalls them all:
    on 2 cores, 2 threads served no more tokens/s than 1, at twice the CPU."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass(slots=True)
class _Sequence:
    rid: int
    prompt: list[int]
    max_new: int                        # tokens to generate at most (max_tokens, within the context)
    temperature: float
    top_p: float
    generator: torch.Generator | None   # None: greedy
    text: TextStream
    arrived: float
    fault: str | None = None
    ignore_eos: bool = False            # generate max_new tokens whatever comes (benchmarks)
    slot: int = -1
    position: int = 0                   # where the next token goes in the cache
    last: int = 0                       # the last token sampled, fed to the next decode step
    generated: int = 0


def _resolve_factory(name: str) -> Callable[..., CausalLM]:
    target = TORCH_MODELS.get(name, name)
    module, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UnrecoverableError(f"model {name!r}: cannot import {target}: {exc}") from exc
    if not callable(factory):
        raise UnrecoverableError(f"model {name!r}: {target} is not callable")
    return factory


class TorchRunner(ModelRunner):
    def __init__(self, options: dict[str, Any], devices: tuple, capacity: int):
        super().__init__(options, devices, capacity)
        # The worker's credits are the batch's slots: max_batch_size, within max_concurrency.
        self.capacity = min(capacity, options.get("max_batch_size", capacity))
        self.delay = options.get("max_batch_delay_ms", DEFAULT_BATCH_DELAY_MS) / 1000
        self.prefill_tokens = options.get("max_prefill_tokens", DEFAULT_PREFILL_TOKENS)
        self.dtype_name = options.get("dtype", "float32")
        self.checkpoint = options.get("checkpoint")
        if self.checkpoint:
            from inferd.models import hf

            hf.preload()
        self.model: CausalLM | None = None
        self.cache: Any = None
        self.device = torch.device("cpu")
        self._steps = self._generated = 0
        self._ends: frozenset[int] = frozenset()
        self._reset()

    def _reset(self) -> None:
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._slots: list[_Sequence | None] = [None] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() takes the lowest slot
        self._by_rid: dict[int, _Sequence] = {}
        # Each slot's last token and its position, the next decode step's input (host lists:
        # one tensor is built from each per step, cheaper than a write per slot).
        self._tokens = [0] * self.capacity
        self._positions = [0] * self.capacity

    # --- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        self.device = self._pick_device()
        dtype = self._pick_dtype()
        if self.device.type == "cpu":
            torch.set_num_threads(self.options.get("cpu_threads", default_cpu_threads()))
        weights = self.options.get("weights")
        if self.checkpoint:
            name, source = "hf", f"checkpoint {self.checkpoint}"
        else:
            name = self.options.get("model", "tiny")
            source = f"weights {weights}" if weights else f"seed {self.options.get('seed', 0)}"
        log.info("loading model %s (%s) on %s as %s, %d batch slot(s)%s", name, source, self.device,
                 self.dtype_name, self.capacity,
                 f", {torch.get_num_threads()} thread(s)" if self.device.type == "cpu" else "")
        started = time.monotonic()
        if self.checkpoint:
            from inferd.models import hf

            model = hf.build(checkpoint=self.checkpoint, device=self.device, dtype=dtype,
                             max_seq_len=self.options.get("max_seq_len"), progress=self._progress)
        else:
            model = _resolve_factory(name)(device=self.device, dtype=dtype, weights=weights,
                                           seed=self.options.get("seed", 0))
        missing = [a for a in ("tokenizer", "max_seq_len", "new_cache", "prefill", "decode") if not hasattr(model, a)]
        if missing:
            raise UnrecoverableError(f"model {name!r}: the factory's model has no {', '.join(missing)} "
                                     "(see inferd.models.interface.CausalLM)")
        self.model = model
        self.cache = model.new_cache(self.capacity)
        self._ends = getattr(model.tokenizer, "eos_ids", None) or frozenset({model.tokenizer.eos_id} - {None})
        count = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
        log.info("model %s loaded in %.2f s: %.2f M parameters, context %d tokens", name,
                 time.monotonic() - started, count / 1e6, model.max_seq_len)
        self._reset()

    def _progress(self, what: str) -> None:
        """A long load's current phase: in the log, and in ``inferctl status`` until it is ready."""
        log.info("loading: %s", what)
        self.progress = what

    def _pick_device(self) -> torch.device:
        gpus = [d for d in self.devices if d.kind == "cuda"]
        if not gpus:
            log.info("no GPU placed on this worker: running on the CPU")
            return torch.device("cpu")
        if not torch.cuda.is_available():
            log.warning("placed on %s, but torch %s sees no CUDA device: running on the CPU",
                        ",".join(d.id for d in gpus), torch.__version__)
            return torch.device("cpu")
        if len(gpus) > 1:
            log.warning("%d GPUs pinned; the torch runtime uses the first (no tensor parallelism)", len(gpus))
        return torch.device("cuda", 0)  # the first pinned GPU: CUDA_VISIBLE_DEVICES renumbers from 0

    def _pick_dtype(self) -> torch.dtype:
        dtype = DTYPES[self.dtype_name]
        if self.device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UnrecoverableError(f"dtype bfloat16 is not supported on {torch.cuda.get_device_name()}")
        try:  # a matmul and a softmax are what a step needs of a dtype
            probe = torch.ones(2, 2, device=self.device, dtype=dtype)
            torch.softmax(probe @ probe, -1)
        except RuntimeError as exc:
            raise UnrecoverableError(f"dtype {self.dtype_name} is not supported on {self.device}: {exc}") from exc
        return dtype

    def warmup(self) -> None:
        """One prefill and two decode steps on the real batch shape, so the first
        request pays no one-time costs (allocator growth, kernel selection)."""
        started = time.monotonic()
        logits = self.model.prefill(torch.tensor(self.model.tokenizer.encode("warm-up"), device=self.device),
                                    self.cache, 0)
        for _ in range(2):
            logits = self.model.decode(*self._decode_inputs(), self.cache)
        logits.cpu()
        self.progress = ""
        log.info("warm-up done in %.2f s", time.monotonic() - started)

    def close(self) -> None:
        self.model = self.cache = None
        self._reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- requests ----------------------------------------------------------------------------

    def admit(self, request: RunRequest) -> None:
        params = request.params
        tokenizer = self.model.tokenizer
        if request.messages is None:
            prompt = tokenizer.encode(request.prompt)
        elif getattr(tokenizer, "has_chat_template", False):
            prompt = tokenizer.encode_chat(request.messages)
        else:
            prompt = tokenizer.encode(render_plain(request.messages))
        room = self.model.max_seq_len - len(prompt) + 1  # the last token sampled needs no cache slot
        if not prompt or room < 1:
            raise RequestRejected(ErrorCode.BAD_REQUEST, (
                f"the prompt is {len(prompt)} tokens; this model's context is {self.model.max_seq_len}"
                if prompt else "the prompt is empty"))
        temperature = float(params.get("temperature", 0.0))
        generator = None
        if temperature > 0:
            seed = params.get("seed", random.getrandbits(63))
            generator = torch.Generator().manual_seed(seed)
        stop = params.get("stop", ())
        seq = _Sequence(request.rid, prompt, min(params.get("max_tokens", DEFAULT_MAX_TOKENS), room), temperature,
                        float(params.get("top_p", 1.0)), generator,
                        TextStream((stop,) if isinstance(stop, str) else tuple(stop)), time.monotonic(),
                        params.get("fault") if self.options.get("fault_injection") is True else None,
                        params.get("ignore_eos", False))
        self._by_rid[seq.rid] = seq
        self._pending.append(seq)

    def cancel(self, rid: int) -> None:
        seq = self._by_rid.pop(rid, None)
        if seq is None:
            return
        if seq.slot < 0:
            self._pending.remove(seq)
        else:
            self._leave(seq)

    def _leave(self, seq: _Sequence) -> None:
        self._slots[seq.slot] = None
        self._free.append(seq.slot)
        self._free.sort(reverse=True)

    def next_step_in(self) -> float | None:
        if len(self._free) < self.capacity:
            return 0.0   # sequences generating: no waiting
        if not self._pending:
            return None
        if len(self._pending) >= self.capacity:
            return 0.0   # the batch is full
        return max(0.0, self._pending[0].arrived + self.delay - time.monotonic())

    # --- one iteration -----------------------------------------------------------------------

    def step(self) -> list[Output]:
        outputs = []
        decoding = [seq for seq in self._slots if seq is not None]
        joining = []
        budget = self.prefill_tokens
        while self._pending and self._free and (not joining or len(self._pending[0].prompt) <= budget):
            seq = self._pending.popleft()
            budget -= len(seq.prompt)
            seq.slot = self._free.pop()
            self._slots[seq.slot] = seq
            joining.append(seq)
        for seq in decoding + joining:
            if seq.fault:
                self._inject(seq.fault)
        rows = []
        if decoding:
            for seq in decoding:
                self._tokens[seq.slot] = seq.last
                self._positions[seq.slot] = seq.position
            live = [seq.slot for seq in decoding]
            logits = self.model.decode(*self._decode_inputs(), self.cache, live)
            rows.append(logits[torch.tensor(live, device=self.device)])
        for seq in joining:
            prompt = torch.tensor(seq.prompt, device=self.device)
            rows.append(self.model.prefill(prompt, self.cache, seq.slot).unsqueeze(0))
            seq.position = len(seq.prompt) - 1  # _advance moves it past the prompt
        if rows:
            logits = torch.cat(rows).float().cpu()  # one device-to-host copy per step
            greedy = logits.argmax(-1).tolist()     # one op for every greedy row
            for i, seq in enumerate(decoding + joining):
                token = greedy[i] if seq.generator is None else self._sample(seq, logits[i])
                outputs.append(self._advance(seq, token))
        self._steps += 1
        return outputs

    def _decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self._tokens, device=self.device), torch.tensor(self._positions, device=self.device))

    @staticmethod
    def _sample(seq: _Sequence, logits: torch.Tensor) -> int:
        """A token drawn with the request's temperature, top_p and generator."""
        probs = torch.softmax(logits / seq.temperature, -1)
        if seq.top_p < 1.0:
            # Nucleus: the most likely tokens whose mass reaches top_p (at least one).
            probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(probs, -1) - probs < seq.top_p
            probs = probs * keep
            return int(order[torch.multinomial(probs, 1, generator=seq.generator)])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _advance(self, seq: _Sequence, token: int) -> Output:
        seq.generated += 1
        seq.position += 1
        seq.last = token
        self._generated += 1
        tokenizer = self.model.tokenizer
        if token in self._ends and not seq.ignore_eos:  # a checkpoint may list several end tokens
            return self._finish(seq, seq.text.finish(), FINISH_STOP)
        text = seq.text.push(tokenizer.token_bytes(token))
        if seq.text.stopped:
            return self._finish(seq, text, FINISH_STOP)
        if seq.generated >= seq.max_new:
            return self._finish(seq, text + seq.text.finish(), FINISH_LENGTH)
        return Output(seq.rid, text or None)

    def _finish(self, seq: _Sequence, text: str, reason: str) -> Output:
        self._by_rid.pop(seq.rid, None)
        self._leave(seq)
        return Output(seq.rid, text or None, reason, usage={"prompt_tokens": len(seq.prompt),
                                                            "completion_tokens": seq.generated})

    def _inject(self, fault: str) -> None:
        """Test-only faults (``options.fault_injection``), real where the device allows."""
        if fault == "oom":  # a real allocation failure on this device
            torch.empty(1 << 60, dtype=torch.uint8, device=self.device)
        if fault == "poison":
            if self.device.type == "cuda":  # a real device-side assert: the context is poisoned for good
                torch.zeros(1, device=self.device)[torch.tensor([1 << 20], device=self.device)].cpu()
                torch.cuda.synchronize()
            raise ContextPoisonedError("injected fault: CUDA error: an illegal memory access was encountered")
        raise RuntimeError(f"injected fault: {fault}")

    def load_report(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": self.dtype_name, "batch": self.capacity - len(self._free),
                "slots": self.capacity, "waiting": len(self._pending), "steps": self._steps,
                "tokens": self._generated}
