"""Quantized bases (QLoRA): peak memory and step time at float32, bfloat16, nf4 and int8,
lorakit against PEFT, on a ~1.1B Llama built from a config (random weights, no download).

Run by hand (see benchmarks/README.md)::

    .venv/bin/python benchmarks/bench_quant.py                  # all variants
    .venv/bin/python benchmarks/bench_quant.py --only nf4 --steps 2
    python benchmarks/bench_quant.py --device cuda --batch 4 --seq 512   # the CUDA rows

The model (TinyLlama-1.1B's shape) is written once to ``benchmarks/results/llama-1b`` in
bfloat16. Each variant runs in its own process: load, add LoRA (r=16 on the seven
projections), forget the loading peak (``/proc/self/clear_refs``), then ``--warmup`` + ``--steps``
training steps; it reports the median step and the peak RSS of the training run (on CUDA:
tokens/s and the peak GPU memory allocated). A markdown table goes to stdout and the numbers
to ``benchmarks/results/quant-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = RESULTS / "llama-1b"
PRECISIONS = ["float32", "bfloat16", "nf4", "int8"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare() -> None:
    """Write the random 1.1B Llama once (bfloat16 safetensors, ~2.2 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (MODEL / "config.json").exists():
        return
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(MODEL)


def load(precision: str, device: str, compute: str) -> torch.nn.Module:
    """The model at ``precision``. A quantized base computes in ``compute``, the dtype of the
    layers it leaves unquantized (embedding, norms, head) too, as ``--dtype`` does in lorakit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute),
        ),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }.get(precision)
    dtype = getattr(torch, compute if quant else precision)
    return AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=dtype, quantization_config=quant, device_map={"": device}
    )


def adapt(model: torch.nn.Module, library: str) -> torch.nn.Module:
    if library == "lorakit":
        from lorakit import LoraConfig, add_lora

        return add_lora(model, LoraConfig(r=16, alpha=32, target_modules=PROJECTIONS))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))


def child(library: str, precision: str, args: argparse.Namespace) -> dict:
    """One variant, in its own process: median step seconds, training peak RSS (CUDA: peak
    GPU memory allocated)."""
    cuda = args.device == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = adapt(load(precision, args.device, args.compute), library).train()
    Path("/proc/self/clear_refs").write_text("5")  # forget the loading peak
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    step = statistics.median(times)
    result = {"step_s": step, "peak_rss_mib": peak, "tokens_s": args.batch * args.seq / step}
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def table(results: dict, device: str) -> str:
    """Markdown rows; memory is the peak RSS on the CPU, the peak GPU allocation on CUDA."""
    key, what = ("peak_gpu_mib", "peak GPU mem") if device == "cuda" else ("peak_rss_mib", "RSS")
    lines = [f"| precision | library | step | tokens/s | peak {what} | vs float32 | vs PEFT |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (precision, library), r in results.items():
        fp32 = results.get(("float32", library))
        peer = results.get((precision, "peft"))
        mem = f"{r[key] / fp32[key]:.2f}x {what}" if fp32 else ""
        vs = (
            f"{r['step_s'] / peer['step_s']:.2f}x step, {r[key] / peer[key]:.2f}x {what}"
            if peer and library == "lorakit"
            else ""
        )
        lines.append(
            f"| {precision} | {library} | {r['step_s']:.2f} s | {r['tokens_s']:.3g} "
            f"| {r[key]:.0f} MiB | {mem} | {vs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    prepare()
    results = {}
    for precision in args.only:
        for library in args.libraries:
            cmd = [sys.executable, __file__, "--child", library, precision]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            cmd += ["--device", args.device, "--compute", args.compute]
            # glibc keeps freed blocks of the heap mapped, so RSS would grow step after step with
            # fragmentation (+0.5 GB in 2 steps on nf4); served from mmap, a freed tensor leaves
            # RSS at once and the peak is that of live memory, for both libraries alike.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
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
