"""lorakit against PEFT and the frozen-base floor: train step, memory, inference, routing, I/O.

Run by hand (see benchmarks/README.md)::

    .venv/bin/python benchmarks/bench.py                     # every section, default sizes
    .venv/bin/python benchmarks/bench.py --only train --steps 8 --batch 2 --seq 64

Timed variants run in one process and alternate step by step (A, B, C, A, B, C, ...), so
drift on a shared machine hits every variant alike; each number is the median of ``--steps``
timed steps after ``--warmup`` untimed ones. Peak memory runs one subprocess per variant
(``--only memory-<variant>``) and reads its peak RSS. The markdown table goes to stdout and
everything to ``benchmarks/results/bench-<time>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, add_lora, load_adapter, merge, route, save_adapter
from lorakit.layers import LoraLayer, LoraLinear
from lorakit.models.load import DEFAULT_MODEL, load_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ["train", "dora", "memory", "infer", "route", "io"]
MEMORY_VARIANTS = ["floor", "lorakit", "lorakit-generic", "peft"]


# --- building the variants -------------------------------------------------------------------
def lorakit_model(
    base: nn.Module,
    rank: int,
    names: list[str] = ["default"],  # noqa: B006
    dora: bool = False,
) -> nn.Module:
    model = copy.deepcopy(base)
    config = LoraConfig(r=rank, alpha=2 * rank, target_modules=PROJECTIONS, use_dora=dora)
    for name in names:
        add_lora(model, config, name)
    return model


def peft_model(
    base: nn.Module,
    rank: int,
    names: list[str] = ["default"],  # noqa: B006
    dora: bool = False,
) -> nn.Module:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    def config() -> PeftConfig:
        return PeftConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=PROJECTIONS,
            lora_dropout=0.0,
            use_dora=dora,
        )

    model = get_peft_model(copy.deepcopy(base), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    return model


def generic_path(model: nn.Module) -> nn.Module:
    """lorakit as it was before ``LoraLinearFunction``: the generic ``LoraLayer.forward`` and
    ``F.linear(F.linear(x, A), B) * scale``, for a before/after comparison in one process."""

    def lora_output(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        return F.linear(F.linear(layer._dropped(name, x), A), B) * layer.scale[name]

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(LoraLayer.forward, module)
            module.lora_output = types.MethodType(lora_output, module)
    return model


def per_layer(model: nn.Module) -> nn.Module:
    """lorakit with each adapted layer in its own node (``layers/shared_input.py`` off): the
    code before shared-input fusion, for a before/after comparison in one process."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module._shared = None
    return model


def floor_model(base: nn.Module) -> nn.Module:
    """The frozen base with gradients for activations only: the cost LoRA cannot go below."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    # The embedding output requires grad, so backward runs through every layer (activations).
    model.enable_input_require_grads()
    return model


def full_model(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    return model


def train_variant(name: str, base: nn.Module, rank: int) -> nn.Module:
    build = {
        "floor": floor_model,
        "lorakit": lambda b: lorakit_model(b, rank),
        "lorakit-generic": lambda b: generic_path(lorakit_model(b, rank)),
        "lorakit-per-layer": lambda b: per_layer(lorakit_model(b, rank)),
        "peft": lambda b: peft_model(b, rank),
        "lorakit-dora": lambda b: lorakit_model(b, rank, dora=True),
        "lorakit-dora-generic": lambda b: generic_path(lorakit_model(b, rank, dora=True)),
        "peft-dora": lambda b: peft_model(b, rank, dora=True),
        "full": full_model,
    }
    return build[name](base).train()


def train_step_fn(model: nn.Module, batch: dict, as_train: bool = False) -> Callable[[], None]:
    """One forward + backward + AdamW step (no optimizer for the floor: nothing trains).

    ``as_train``: as ``lorakit train`` runs it, the chunked loss from the hidden states and
    fused AdamW (``lorakit.training``); otherwise transformers' loss and torch's AdamW.
    """
    from lorakit.training.loss import token_losses

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=as_train) if params else None
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        if as_train:
            loss = (
                token_losses(model, inputs, batch["labels"]).sum() / batch["labels"][:, 1:].numel()
            )
        else:
            loss = model(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def fake_batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def randomize_b(model: nn.Module) -> None:
    """Non-zero B so the adapters change the output (merged weights really differ)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)


# --- timing ----------------------------------------------------------------------------------
def alternate(fns: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, dict]:
    """Median seconds per call of each fn, calls interleaved so machine drift cancels."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v}
        for k, v in times.items()
    }


def bench_train(base: nn.Module, args: argparse.Namespace) -> dict:
    """The step of each variant; ``lorakit train`` is lorakit with train's loss and AdamW, and
    ``--compile`` adds it under torch.compile (its first two calls compile: warm-up)."""
    batch = fake_batch(base.config.vocab_size, args.batch, args.seq)
    variants = ["floor", "lorakit", "lorakit-per-layer", "peft"] + (
        [] if args.no_full else ["full"]
    )
    fns = {v: train_step_fn(train_variant(v, base, args.rank), batch) for v in variants}
    fns["lorakit train"] = train_step_fn(train_variant("lorakit", base, args.rank), batch, True)
    if args.compile:
        compiled = torch.compile(train_variant("lorakit", base, args.rank))
        fns["lorakit train --compile"] = train_step_fn(compiled, batch, True)
    return alternate(fns, max(args.warmup, 2 if args.compile else 0), args.steps)


def bench_infer(base: nn.Module, args: argparse.Namespace) -> dict:
    batch = fake_batch(base.config.vocab_size, args.batch, args.seq)
    batch.pop("labels")
    unmerged = lorakit_model(base, args.rank)
    randomize_b(unmerged)
    merged = merge(copy.deepcopy(unmerged))
    peft = peft_model(base, args.rank)
    randomize_b(peft)
    generic = generic_path(copy.deepcopy(unmerged))
    models = {"base": base, "lorakit": unmerged, "lorakit-merged": merged}
    models |= {"lorakit-generic": generic, "peft": peft}

    def call(m: nn.Module) -> Callable[[], object]:
        return lambda: m(**batch)

    with torch.inference_mode():
        return alternate({k: call(m.eval()) for k, m in models.items()}, args.warmup, args.steps)


def bench_route(base: nn.Module, args: argparse.Namespace) -> dict:
    names = [f"a{i}" for i in range(8)]
    ours = lorakit_model(base, args.rank, names).eval()
    theirs = peft_model(base, args.rank, names).eval()
    randomize_b(ours)
    randomize_b(theirs)
    out = {}
    for per in (1, 4):
        rows = [n for n in names for _ in range(per)]
        batch = fake_batch(base.config.vocab_size, len(rows), args.seq)
        batch.pop("labels")

        def lorakit_call(rows: list[str] = rows, batch: dict = batch) -> object:
            with route(ours, rows):
                return ours(**batch)

        fns = {
            "base": lambda batch=batch: base(**batch),
            "lorakit": lorakit_call,
            "peft": lambda rows=rows, batch=batch: theirs(**batch, adapter_names=rows),
        }
        with torch.inference_mode():
            res = alternate(fns, args.warmup, args.steps)
        out.update({f"{k} 8x{per}": v for k, v in res.items()})
    return out


def bench_io(base: nn.Module, args: argparse.Namespace) -> dict:
    rank = 16
    model = copy.deepcopy(base)
    add_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    randomize_b(model)
    fresh = [copy.deepcopy(base) for _ in range(args.warmup + args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        it = iter(fresh)
        res = alternate(
            {
                "save r=16": lambda: save_adapter(model, tmp),
                "load r=16": lambda: load_adapter(next(it), tmp),
            },
            args.warmup,
            args.steps,
        )
        res["save r=16"]["bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return res


def memory_child(variant: str, base: nn.Module, args: argparse.Namespace) -> dict:
    """Runs in its own process: a few training steps, then this process's peak RSS."""
    model = train_variant(variant, base, args.rank)
    del base
    gc.collect()
    # Forget the peak of loading (conversion, safetensors reads): count the training run only.
    Path("/proc/self/clear_refs").write_text("5")
    step = train_step_fn(model, fake_batch(model.config.vocab_size, args.batch, args.seq))
    for _ in range(3):
        step()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_mib": kib / 1024}


def bench_memory(args: argparse.Namespace) -> dict:
    out = {}
    for variant in MEMORY_VARIANTS:
        cmd = [sys.executable, __file__, "--only", f"memory-{variant}", "--json-stdout"]
        cmd += ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--rank", str(args.rank), "--threads", str(args.threads)]
        # Freed tensors leave RSS at once when served from mmap; with glibc's default heap,
        # fragmentation adds a chance amount to each variant's peak (see bench_quant.py).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# --- report ----------------------------------------------------------------------------------
def bench_dora(base: nn.Module, args: argparse.Namespace) -> dict:
    """DoRA's step against LoRA's, lorakit and PEFT (PEFT's DoRA is known to cost ~2x LoRA)."""
    batch = fake_batch(base.config.vocab_size, args.batch, args.seq)
    variants = ["lorakit", "lorakit-dora", "lorakit-dora-generic", "peft", "peft-dora"]
    fns = {v: train_step_fn(train_variant(v, base, args.rank), batch) for v in variants}
    return alternate(fns, args.warmup, args.steps)


def ms(res: dict, key: str) -> float:
    return res[key]["median_s"] * 1e3


def table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"model `{args.model}`, batch {args.batch} x seq {args.seq}, r={args.rank}, "
        f"medians of {args.steps} steps after {args.warmup} warm-up; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| measurement | variant | value | ratio |",
        "|---|---|---|---|",
    ]

    def row(section: str, variant: str, value: str, ratio: str = "") -> None:
        lines.append(f"| {section} | {variant} | {value} | {ratio} |")

    if "train" in results:
        r = results["train"]
        for v in r:
            extra = f"{ms(r, v) / ms(r, 'floor'):.3f}x floor"
            if v.startswith("lorakit"):
                extra += f", {ms(r, v) / ms(r, 'peft'):.3f}x PEFT"
            row("train step", v, f"{ms(r, v):.1f} ms", extra)
    if "dora" in results:
        r = results["dora"]
        for v in r:
            peer = "peft-dora" if "dora" in v else "peft"
            extra = f"{ms(r, v) / ms(r, 'lorakit'):.3f}x lorakit LoRA, {ms(r, v) / ms(r, peer):.3f}x {peer}"
            row("DoRA train step", v, f"{ms(r, v):.1f} ms", extra)
    if "memory" in results:
        r = results["memory"]
        for v in r:
            ratio = f"{r[v]['peak_rss_mib'] / r['peft']['peak_rss_mib']:.3f}x PEFT"
            row("peak RSS (train)", v, f"{r[v]['peak_rss_mib']:.0f} MiB", ratio)
    if "infer" in results:
        r = results["infer"]
        for v in r:
            row(
                "inference forward",
                v,
                f"{ms(r, v):.1f} ms",
                f"{ms(r, v) / ms(r, 'base'):.3f}x base",
            )
    if "route" in results:
        r = results["route"]
        for v in r:
            per = v.split()[-1]
            ratio = f"{ms(r, v) / ms(r, f'base {per}'):.3f}x base"
            if v.startswith("lorakit"):
                ratio += f", {ms(r, f'peft {per}') / ms(r, v):.2f}x PEFT throughput"
            row("routed batch (8 adapters)", v, f"{ms(r, v):.1f} ms", ratio)
    if "io" in results:
        r = results["io"]
        for v in r:
            row(
                "adapter file",
                v,
                f"{ms(r, v):.1f} ms",
                f"{r['save r=16']['bytes'] / 2**20:.1f} MiB",
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=SECTIONS, help=f"sections: {SECTIONS}")
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument("--compile", action="store_true", help="train: add torch.compile")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps timings stable on a shared machine (2 threads on 2 busy "
        "cores wait on each other at every OpenMP barrier)",
    )
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base, _ = load_model(args.model)
    if len(args.only) == 1 and args.only[0].startswith("memory-"):
        print(json.dumps(memory_child(args.only[0].removeprefix("memory-"), base, args)))
        return
    benches = {
        "train": bench_train,
        "dora": bench_dora,
        "infer": bench_infer,
        "route": bench_route,
        "io": bench_io,
    }
    results = {}
    for section in args.only:
        t0 = time.perf_counter()
        if section == "memory":
            results[section] = bench_memory(args)
        else:
            results[section] = benches[section](base, args)
        print(f"[{section}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    report = table(results, args)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"args": vars(args), "results": results, "table": report}
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
