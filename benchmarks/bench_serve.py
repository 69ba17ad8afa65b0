"""Throughput and latency of ``lorakit serve`` with many adapters (run by hand).

Starts ``lorakit serve`` on 127.0.0.1 with the bundled SmolLM2 and ``--adapters`` random
adapters, then, through the official ``openai`` client, times three ways of serving
``--requests`` requests of ``--tokens`` new tokens each (greedy, EOS ignored so every
request generates exactly that many):

- mixed: all at once, request i for adapter i (one batch across adapters);
- one after another: the same requests, each sent when the previous one has finished (what a
  server that cannot batch different adapters does);
- base alone: all at once, every request for the base model.

The three run in turn within each round (``--rounds``, after one warm-up round), so load from
other jobs on the machine hits them alike. Besides wall-clock tokens/s, the table gives tokens
per CPU-second of the server process (Linux: ``/proc``): with ``--threads 1`` that is the
server's own work, which other jobs on a busy machine change far less than its wall time.
Prints a markdown table; writes every timing to ``benchmarks/results/serve-<time>.json``
(git-ignored).

    .venv/bin/python benchmarks/bench_serve.py                 # 8 adapters, 8 x 64 tokens
    .venv/bin/python benchmarks/bench_serve.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"


def make_adapters(model_spec: str, count: int, rank: int, folder: Path) -> dict[str, str]:
    """``count`` adapters (r=rank, alpha=2r, the seven projections, random B) saved in folder."""
    import torch

    from lorakit import LoraConfig, add_lora, delete_adapter, save_adapter
    from lorakit.layers import LoraLayer
    from lorakit.models.load import load_model

    model, _ = load_model(model_spec)
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for i in range(count):
        name = f"a{i}"
        add_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=PROJECTIONS), name)
        with torch.no_grad():  # B = 0 would make every adapter the base model
            for module in model.modules():
                if isinstance(module, LoraLayer) and name in module.lora_B:
                    B = module.lora_B[name]
                    B.copy_(torch.randn(B.shape, generator=generator) * 0.01)
        adapters[name] = str(save_adapter(model, folder / name, name))
        delete_adapter(model, name)
    return adapters


def start_server(
    args: argparse.Namespace, adapters: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    """``lorakit serve`` in a subprocess; (process, base URL) once it listens."""
    argv = [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--port", "0"]
    argv += ["--log-level", "warning", "--max-batch-size", str(max(16, args.requests))]
    argv += [f"--adapter={name}={path}" for name, path in adapters.items()]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        print(f"  server: {line.rstrip()}", file=sys.stderr)
        if line.startswith("serving"):
            return proc, line.split(" at ")[1].split()[0]
    proc.kill()
    raise SystemExit("lorakit serve did not start")


async def one(client, model: str, i: int, tokens: int, start: float) -> float:
    """Seconds from ``start`` until a greedy request of ``tokens`` new tokens has its reply."""
    reply = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me a story about the number {i}."}],
        temperature=0,
        max_tokens=tokens,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == tokens, reply.usage
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def scenario(client, models: list[str], tokens: int, together: bool, pid: int) -> dict:
    """Wall time, server CPU time and latencies of serving ``models`` (one request each).

    Every request counts as arriving at the start, so a latency is the time its client waits
    for the reply: one after another, the k-th also waits for the k - 1 before it.
    """
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    calls = [(m, i) for i, m in enumerate(models)]
    if together:
        latencies = await asyncio.gather(*(one(client, m, i, tokens, start) for m, i in calls))
    else:
        latencies = [await one(client, m, i, tokens, start) for m, i in calls]
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "cpu_s": cpu_seconds(pid) - cpu,
        "latencies_s": list(latencies),
        "tokens": tokens * len(models),
    }


async def measure(
    url: str, args: argparse.Namespace, names: list[str], pid: int
) -> dict[str, list[dict]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    mixed = [names[i % len(names)] for i in range(args.requests)]
    plans = {
        "mixed": (mixed, True),
        "one after another": (mixed, False),
        "base alone": ([args.model] * args.requests, True),  # the base answers to --model
    }
    results: dict[str, list[dict]] = {name: [] for name in plans}
    for round_ in range(args.rounds + 1):
        for name, (models, together) in plans.items():
            result = await scenario(client, models, args.tokens, together, pid)
            label = "warm-up" if round_ == 0 else f"round {round_}/{args.rounds}"
            rate, cpu_rate = (result["tokens"] / result[k] for k in ("wall_s", "cpu_s"))
            print(
                f"  {label}: {name}: {rate:.1f} tokens/s, {cpu_rate:.1f} per server CPU-s",
                file=sys.stderr,
            )
            if round_ > 0:
                results[name].append(result)
    return results


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratios(rate: dict[str, float]) -> dict[str, str]:
    """Each way's ratios to the others, with the targets' verdicts for mixed."""
    mixed, seq, base = rate["mixed"], rate["one after another"], rate["base alone"]
    return {
        "mixed": f"{mixed / base:.2f}x base alone (≥ 0.8: "
        f"{'met' if mixed >= 0.8 * base else 'missed'}), {mixed / seq:.2f}x one after another "
        f"(≥ 3: {'met' if mixed >= 3 * seq else 'missed'})",
        "one after another": f"{seq / base:.2f}x base alone",
        "base alone": "1.00x",
    }


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: median tokens/s over rounds (wall and server CPU), ratios, p50/p95 latency."""
    rate, cpu_rate = (
        {
            name: statistics.median(r["tokens"] / r[key] for r in runs)
            for name, runs in results.items()
        }
        for key in ("wall_s", "cpu_s")
    )
    by_wall, by_cpu = ratios(rate), ratios(cpu_rate)
    head = "| serving | tokens/s | ratio | tokens per server CPU-s | ratio | p50 latency | p95 latency |"
    rows = [head, "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        latencies = [x for r in runs for x in r["latencies_s"]]
        rows.append(
            f"| {name} | {rate[name]:.1f} | {by_wall[name]} | {cpu_rate[name]:.1f} | "
            f"{by_cpu[name]} | {percentile(latencies, 0.5):.2f} s | "
            f"{percentile(latencies, 0.95):.2f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"making {args.adapters} adapters (r={args.rank})", file=sys.stderr)
        adapters = make_adapters(args.model, args.adapters, args.rank, Path(tmp))
        proc, url = start_server(args, adapters)
        try:
            results = asyncio.run(measure(url, args, list(adapters), proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    text = table(results)
    print(
        f"\n{args.model}, {args.adapters} adapters r={args.rank} on the seven projections, "
        f"{args.requests} requests x {args.tokens} new tokens, threads={args.threads or 'torch default'}, "
        f"medians of {args.rounds} rounds; load average before {load[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f}\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\ntimings: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
