"""Quantized bases (QLoRA): whole-process peak memory and step time at float32, bfloat16, nf4
and int8, lorakit against PEFT, on a Llama built from a config (random weights, no download).

Run by hand (see benchmarks/README.md)::

    .venv/bin/python benchmarks/bench_quant.py                  # all variants, 506M model
    .venv/bin/python benchmarks/bench_quant.py --only nf4 --steps 2
    .venv/bin/python benchmarks/bench_quant.py --size 1b        # TinyLlama-1.1B's shape
    python benchmarks/bench_quant.py --device cuda --batch 4 --seq 512   # the CUDA rows

The model is written once to ``benchmarks/results/llama-<size>`` in bfloat16, with a small
word-level tokenizer so that lorakit's ``load_model`` (what ``lorakit train`` calls) loads it.
Each variant runs in its own process, under glibc's default malloc settings: load (lorakit:
``load_model``, whose ``--quantize`` path streams the checkpoint; PEFT: transformers'
``from_pretrained`` with the same ``BitsAndBytesConfig``), add LoRA (r=16 on the seven
projections), then ``--warmup`` + ``--steps`` AdamW steps. It reports the median step, the
peak RSS of the whole process (``VmHWM``, the counter ``getrusage``'s ``ru_maxrss`` reads,
taken before and after the loading peak is forgotten) and, as a second figure, the peak of
the training run alone (``VmHWM`` after ``/proc/self/clear_refs``). On CUDA: tokens/s and the
peak GPU memory allocated. A markdown table goes to stdout and the numbers to
``benchmarks/results/quant-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Llama shapes: (hidden, intermediate, layers, heads, kv heads); vocab 32000, untied head.
SIZES = {"500m": (1024, 4096, 28, 16, 8), "1b": (2048, 5632, 22, 32, 4)}
PRECISIONS = ["float32", "bfloat16", "nf4", "int8"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(size: str) -> Path:
    """Write the random Llama of ``size`` once (bfloat16 safetensors: 506M params, ~1 GB; or
    1.1B, ~2.2 GB) with a four-word tokenizer; return its folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = RESULTS / f"llama-{size}"
    if (folder / "tokenizer.json").exists():
        return folder
    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(folder)
    return folder


def bnb_config(precision: str, compute: str) -> object:
    """lorakit's ``--quantize`` settings (models/precision.quantization_config), for PEFT."""
    from transformers import BitsAndBytesConfig

    return {
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute),
        ),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }.get(precision)


def load(folder: Path, library: str, precision: str, device: str, compute: str) -> torch.nn.Module:
    """The model at ``precision``. A quantized base computes in ``compute``, the dtype of the
    layers it leaves unquantized (embedding, norms, head) too, as ``--dtype`` does in lorakit.
    lorakit loads as ``lorakit train`` does; PEFT users load through transformers."""
    quantized = precision in ("nf4", "int8")
    dtype = compute if quantized else precision
    if library == "lorakit":
        from lorakit.models.load import load_model

        quantize = precision if quantized else None
        return load_model(str(folder), dtype=dtype, quantize=quantize, device=device)[0]
    from transformers import AutoModelForCausalLM

    quant = bnb_config(precision, compute)
    placement = {"quantization_config": quant, "device_map": {"": device}} if quant else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **placement)


def peak_rss_mib() -> float:
    """``VmHWM``: the process's peak resident set since it started or since ``clear_refs``."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return kib / 1024


def adapt(model: torch.nn.Module, library: str) -> torch.nn.Module:
    if library == "lorakit":
        from lorakit import LoraConfig, add_lora

        return add_lora(model, LoraConfig(r=16, alpha=32, target_modules=PROJECTIONS))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))


def child(library: str, precision: str, args: argparse.Namespace) -> dict:
    """One variant, in its own process: median step seconds, peak RSS of the whole process
    and of the training run alone (CUDA: peak GPU memory allocated)."""
    cuda = args.device == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load(RESULTS / f"llama-{args.size}", library, precision, args.device, args.compute)
        model = adapt(base, library).train()
    load_peak = peak_rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # from here VmHWM counts the training run
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(
        0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    ).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # the step's kernels finish before the clock stops
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    train_peak = peak_rss_mib()
    step = statistics.median(times)
    result = {
        "step_s": step,
        "tokens_s": args.batch * args.seq / step,
        "load_rss_mib": load_peak,
        "train_rss_mib": train_peak,
        "peak_rss_mib": max(load_peak, train_peak),
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def table(results: dict, device: str) -> str:
    """Markdown rows: whole-process peak RSS (loading included) and its ratio to the same
    library's float32 run, the loading's and the training run's own peaks, step time; on
    CUDA the peak GPU allocation instead of the whole-process RSS."""
    cuda = device == "cuda"
    key = "peak_gpu_mib" if cuda else "peak_rss_mib"
    what = "peak GPU mem" if cuda else "whole-process peak RSS"
    lines = [
        f"| precision | library | step | tokens/s | {what} | vs float32 | loading peak RSS "
        "| training-loop peak RSS | vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (precision, library), r in results.items():
        fp32 = results.get(("float32", library))
        peer = results.get((precision, "peft"))
        mem = f"{r[key] / fp32[key]:.2f}x" if fp32 else ""
        vs = (
            f"{r['step_s'] / peer['step_s']:.2f}x step, {r[key] / peer[key]:.2f}x memory"
            if peer and library == "lorakit"
            else ""
        )
        lines.append(
            f"| {precision} | {library} | {r['step_s']:.2f} s | {r['tokens_s']:.3g} "
            f"| {r[key]:.0f} MiB | {mem} | {r['load_rss_mib']:.0f} MiB "
            f"| {r['train_rss_mib']:.0f} MiB | {vs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500m", choices=list(SIZES))
    parser.add_argument("--only", nargs="*", default=PRECISIONS, choices=PRECISIONS)
    parser.add_argument("--libraries", nargs="*", default=["lorakit", "peft"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # A CPU without AVX-512 BF16 or AMX emulates bfloat16 matmuls: a quantized base computing
    # in float32 there is what `lorakit train --quantize nf4` does with --dtype auto.
    parser.add_argument(
        "--compute",
        choices=["float32", "bfloat16"],
        help="compute dtype of a quantized base (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.compute = args.compute or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    RESULTS.mkdir(exist_ok=True)
    prepare(args.size)
    results = {}
    for precision in args.only:
        for library in args.libraries:
            cmd = [sys.executable, __file__, "--child", library, precision]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            cmd += ["--device", args.device, "--compute", args.compute, "--size", args.size]
            # glibc's default malloc settings, as `lorakit train` runs: heap fragmentation is
            # part of what a user's process holds.
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:  # one failed variant (out of memory, say) keeps the others
                print(f"[{precision} {library} failed]\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[(precision, library)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"[{precision} {library}: {results[(precision, library)]}]", file=sys.stderr)
    report = table(results, args.device)
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"args": vars(args), "results": {" ".join(k): v for k, v in results.items()}}
    (RESULTS / f"quant-{stamp}.json").write_text(json.dumps(payload | {"table": report}, indent=2))


if __name__ == "__main__":
    main()
