"""Expert LoRA: lorakit's grouped path against PEFT's ``target_parameters`` path.

A Qwen3-MoE-shaped model built from a config (random weights, no download; ~0.35B parameters
at the defaults: 12 layers, hidden 512, 64 experts of 256, top-8), LoRA on attention
(q/k/v/o) and on the routed experts (gate_up_proj, down_proj), trained with AdamW:

- ``lorakit``: each expert's LoRA meets its own tokens in grouped GEMMs
  (``kernels.GroupedLoraFunction``); no expert's ΔW is formed.
- ``peft``: PEFT 0.21's ``ParamWrapper``, which adds every expert's ΔW to the weight
  (``W + B A`` for all E experts) in each forward.

Both start from one adapter (lorakit's, B random, loaded into PEFT with ``is_trainable``), see
the same batches and take the same steps, so their losses must agree (1e-5). Steps alternate
(lorakit, peft, lorakit, ...) so a busy machine slows both alike; the step time is the median
of ``--steps`` after ``--warmup``. Peak RSS runs one subprocess per variant (``--only
memory-<variant>``: 3 steps after the loading peak is cleared). Run by hand::

    .venv/bin/python benchmarks/bench_moe.py                  # default sizes
    .venv/bin/python benchmarks/bench_moe.py --steps 3 --warmup 1 --layers 8
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import torch
from torch import nn

from lorakit import LoraConfig, add_lora, save_adapter

VARIANTS = ("lorakit", "peft")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]


def base_model(args: argparse.Namespace) -> nn.Module:
    """The Qwen3-MoE-shaped base, seeded (the same weights in every process)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(config).train()


def adapter_folder(args: argparse.Namespace) -> Path:
    """lorakit's adapter at its start (B random so the experts' LoRA acts from step 1)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    model = base_model(args)
    torch.manual_seed(1)
    config = LoraConfig(
        r=args.rank,
        alpha=2 * args.rank,
        init="random",
        target_modules=ATTENTION,
        target_parameters=EXPERTS,
    )
    save_adapter(add_lora(model, config), folder)
    return folder


def variant(name: str, args: argparse.Namespace, folder: Path) -> nn.Module:
    """The base with the adapter in ``folder``, trainable, as lorakit or PEFT runs it."""
    model = base_model(args)
    if name == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder), is_trainable=True).train()
    from lorakit import load_adapter

    return load_adapter(model, folder).train()


def batches(args: argparse.Namespace) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(64)]


def stepper(model: nn.Module, data: list[torch.Tensor]):
    """One AdamW step on the next batch per call; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    state = {"i": 0}

    def step() -> float:
        ids = data[state["i"] % len(data)]
        state["i"] += 1
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench_time(args: argparse.Namespace, folder: Path) -> dict:
    """Alternating steps: median seconds per step and every loss, per variant."""
    data = batches(args)
    steps = {name: stepper(variant(name, args, folder), data) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            losses[name].append(step())
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": statistics.median(times[name]),
            "times": times[name],
            "losses": losses[name],
        }
        for name in VARIANTS
    }


def memory_child(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """Runs in its own process: 3 training steps, then this process's peak RSS."""
    step = stepper(variant(name, args, folder), batches(args))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # count the training run, not the loading
    for _ in range(3):
        step()
    # VmHWM is the peak that clear_refs resets (getrusage's ru_maxrss may keep the loading's)
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return {
        "peak_rss_mib": kib / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_memory(args: argparse.Namespace, folder: Path) -> dict:
    out = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", f"memory-{name}"]
        cmd += ["--adapter", str(folder)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors leave RSS
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def report(args: argparse.Namespace, timing: dict, memory: dict, params: int) -> str:
    ours, theirs = timing["lorakit"], timing["peft"]
    gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True))
    ratio = ours["median_s"] / theirs["median_s"]
    rss = memory["lorakit"]["peak_rss_mib"] / memory["peft"]["peak_rss_mib"]
    rows = [
        "| measurement | lorakit | PEFT | ratio | target |",
        "|---|---|---|---|---|",
        f"| train step, {args.batch} x {args.seq} | {ours['median_s'] * 1000:.0f} ms | "
        f"{theirs['median_s'] * 1000:.0f} ms | {ratio:.3f}x | <= 0.7x: "
        f"{'met' if ratio <= 0.7 else 'missed'} |",
        f"| peak RSS, training | {memory['lorakit']['peak_rss_mib']:.0f} MiB | "
        f"{memory['peft']['peak_rss_mib']:.0f} MiB | {rss:.3f}x | <= 1x: "
        f"{'met' if rss <= 1 else 'missed'} |",
        f"| max loss difference over {len(ours['losses'])} steps | {gap:.2e} | | | <= 1e-5: "
        f"{'met' if gap <= 1e-5 else 'missed'} |",
    ]
    head = (
        f"Qwen3-MoE-shaped, {params / 1e6:.0f}M parameters ({args.layers} layers, hidden "
        f"{args.hidden}, {args.experts} experts of {args.expert_size}, top-{args.top_k}); "
        f"r={args.rank} on {', '.join(ATTENTION + EXPERTS)}; torch {torch.__version__}, "
        f"{os.cpu_count()} cores, --threads {args.threads}, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (
        ("layers", 12),
        ("hidden", 512),
        ("experts", 64),
        ("expert-size", 256),
        ("top-k", 8),
        ("vocab", 32000),
        ("rank", 8),
        ("batch", 2),
        ("seq", 128),
        ("steps", 5),
        ("warmup", 1),
        ("threads", 1),
    ):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--only", default=None, help="memory-lorakit / memory-peft (internal)")
    parser.add_argument("--adapter", default=None, help="the adapter folder (internal)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.adapter) if args.adapter else adapter_folder(args)
    if args.only:
        print(json.dumps(memory_child(args.only.removeprefix("memory-"), args, folder)))
        return
    params = sum(p.numel() for p in base_model(args).parameters())
    timing = bench_time(args, folder)
    memory = bench_memory(args, folder)
    print(report(args, timing, memory, params))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"bench-moe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"args": vars(args), "timing": timing, "memory": memory, "params": params}
    out.write_text(json.dumps({**record, "machine": platform.platform()}, indent=1))


if __name__ == "__main__":
    main()
