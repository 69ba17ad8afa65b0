"""Long-context training memory: lorakit's chunked loss against full logits and PEFT.

Run by hand (see benchmarks/README.md)::

    .venv/bin/python benchmarks/bench_long_context.py                          # 1k-8k tokens
    .venv/bin/python benchmarks/bench_long_context.py --tokens 1024 2048 --steps 2

The bundled SmolLM2-135M (fp32, vocabulary 49,152), batch 1 of ``--tokens`` random tokens that
all carry loss, LoRA r=8 alpha=16 on q/k/v/o/gate/up/down, dropout 0, with and without
gradient checkpointing. Variants:

- ``lorakit``: :func:`lorakit.training.step.summed_loss` with its default, the chunked loss
  from the hidden states (no (tokens, vocab) logits), and lorakit's optimizer;
- ``lorakit-plain``: the same with ``loss_chunk_tokens=0``, cross-entropy over full logits;
- ``peft``: ``get_peft_model`` with the same LoRA config, ``model(input_ids, labels=...).loss``
  (transformers' own loss) and ``torch.optim.AdamW``.

Each (variant, tokens, checkpointing) runs in a fresh subprocess with glibc's default malloc
settings: load, add LoRA, then ``--steps`` steps of forward, backward and AdamW. It reports
its whole-process peak RSS (``getrusage`` ``ru_maxrss``, loading included), the training
peak alone (``VmHWM`` after ``/proc/self/clear_refs`` once the model is built) and the median
step time. The markdown table goes to stdout, the JSON to ``benchmarks/results/`` (git-ignored)
with a PNG plot of peak RSS against tokens beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ["lorakit", "lorakit-plain", "peft"]


# --- one run, in its own process -------------------------------------------------------------
def _build(variant: str, base: torch.nn.Module, checkpointing: bool):
    """The model, a step's loss function and the optimizer of ``variant``."""
    if variant == "peft":
        from peft import LoraConfig as PeftConfig
        from peft import get_peft_model

        config = PeftConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.0)
        model = get_peft_model(base, config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, lambda batch: model(**batch).loss, torch.optim.AdamW(params, lr=1e-4)
    from lorakit import LoraConfig, add_lora
    from lorakit.training.config import TrainConfig
    from lorakit.training.step import build_optimizer, summed_loss

    add_lora(base, LoraConfig(r=8, alpha=16, target_modules=PROJECTIONS, dropout=0.0))
    chunk = 0 if variant == "lorakit-plain" else None
    count = None

    def loss(batch: dict) -> torch.Tensor:
        nonlocal count
        count = count or int((batch["labels"][:, 1:] != -100).sum())
        return summed_loss(base, batch, chunk) / count  # the mean, as transformers' loss

    optimizer = build_optimizer(base, TrainConfig(data="x", lr=1e-4))
    return base, loss, optimizer


def _training_peak_kib() -> int:
    """``VmHWM``: the peak RSS since the last ``clear_refs`` (KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> dict:
    """One variant: build, clear the loading peak, train ``--steps`` steps, measure."""
    from lorakit.models.load import load_model

    base, _ = load_model(args.model)
    base.config.use_cache = False
    if args.checkpointing:
        # As `lorakit train --gradient-checkpointing` does: non-reentrant, so the adapters of
        # a block whose input needs no grad (frozen embedding) still get theirs.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, loss_fn, optimizer = _build(args.child, base, args.checkpointing)
    model.train()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the training run alone
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens), generator=torch.Generator())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = times[1:] or times  # the first step warms up (allocations, AdamW state)
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_peak_mib": _training_peak_kib() / 1024,
        "median_step_s": statistics.median(timed),
        "times_s": times,
        "losses": losses,
    }


# --- the sweep ----------------------------------------------------------------------------------
def run_child(variant: str, tokens: int, checkpointing: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens-one", str(tokens)]
    cmd += ["--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--checkpointing", "on" if checkpointing else "off"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc defaults
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"model `{args.model}` fp32, batch 1, r=8 alpha=16 on 7 projections; "
        f"{args.steps} steps, median of the last {max(1, args.steps - 1)}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads",
        "",
        "| tokens | checkpointing | variant | peak RSS (process) | vs PEFT | training peak "
        "| vs PEFT | step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    peft = {(r["tokens"], r["checkpointing"]): r for r in results if r["variant"] == "peft"}
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['tokens']} | {r['checkpointing']} | {r['variant']} | "
                f"failed: {r['error']} | | | | |"
            )
            continue
        ref = peft.get((r["tokens"], r["checkpointing"]), {})

        def ratio(key: str, r: dict = r, ref: dict = ref) -> str:
            return f"{r[key] / ref[key]:.2f}x" if key in ref else ""

        lines.append(
            f"| {r['tokens']} | {'on' if r['checkpointing'] else 'off'} | {r['variant']} | "
            f"{r['peak_rss_mib']:.0f} MiB | {ratio('peak_rss_mib')} | "
            f"{r['training_peak_mib']:.0f} MiB | {ratio('training_peak_mib')} | "
            f"{r['median_step_s']:.2f} s |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        for checkpointing, style in ((False, "-"), (True, "--")):
            rows = [
                r
                for r in results
                if r["variant"] == variant
                and r["checkpointing"] == checkpointing
                and "error" not in r
            ]
            if rows:
                label = f"{variant}{', checkpointing' if checkpointing else ''}"
                xs = [r["tokens"] for r in rows]
                ax.plot(xs, [r["peak_rss_mib"] for r in rows], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (batch 1)")
    ax.set_ylabel("peak RSS of the process (MiB)")
    ax.set_title("SmolLM2-135M LoRA training, fp32")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from lorakit.models.load import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument(
        "--checkpointing", choices=["off", "on", "both"], default="both", help="gradient ckpt"
    )
    parser.add_argument("--steps", type=int, default=3, help="steps; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--tokens-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        args.tokens, args.checkpointing = args.tokens_one, args.checkpointing == "on"
        print(json.dumps(child(args)))
        return
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for tokens in args.tokens:
        for checkpointing in modes:
            for variant in args.variants:
                t0 = time.perf_counter()
                result = run_child(variant, tokens, checkpointing, args)
                results.append(
                    {"variant": variant, "tokens": tokens, "checkpointing": checkpointing, **result}
                )
                print(
                    f"[{variant} {tokens} ckpt={checkpointing}: {time.perf_counter() - t0:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
    report = table(results, args)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"args": vars(args), "results": results, "table": report}
    (RESULTS / f"long-context-{stamp}.json").write_text(json.dumps(payload, indent=2))
    plot(results, RESULTS / f"long-context-{stamp}.png")


if __name__ == "__main__":
    main()
