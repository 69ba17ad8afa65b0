"""Low-rank commands: ``extract``, ``resize``, ``factorize``, ``inspect``.

Models are named as everywhere in lorakit (``smollm2-135m``, a ``.gguf`` file, a Hugging Face
folder, an adapter folder for its base); a folder written by ``lorakit factorize`` loads with
its factorised layout.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ALL_LINEAR
from ..errors import LoraError
from .common import (
    check_adapter_folder,
    check_adapter_output,
    check_data_file,
    check_empty_output,
    check_model_spec,
    check_size,
    note_other_base,
    status,
)

if TYPE_CHECKING:
    from torch import nn


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    seq_len: int = 256,
    max_examples: int = 64,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token loss) over every token (prompts too) of the first ``max_examples``.

    Every token, not only the replies ``lorakit eval`` scores: factorising damages the whole
    language model, and the prompt tokens show it too.
    """
    from ..data import encode_examples, read_examples
    from ..training.step import evaluate_loss

    examples = read_examples(path)[:max_examples]
    data = encode_examples(examples, tokenizer, seq_len, train_on_prompt=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return math.exp(evaluate_loss(model, data, batch_size, pad, "perplexity"))


def _targets(values: list[str]) -> list[str] | str:
    return ALL_LINEAR if values == [ALL_LINEAR] else values


def _add_size(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every factorised matrix")
    size.add_argument(
        "--energy",
        type=float,
        help="per module, the smallest rank keeping this fraction of sum(sigma^2), in (0, 1]",
    )


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        nargs="+",
        default=[ALL_LINEAR],
        help="module names (e.g. q_proj v_proj) or all-linear (every Linear but the head)",
    )


# --- extract ---------------------------------------------------------------------------------
def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit extract``."""
    parser.add_argument("--base", required=True, help="the model before fine-tuning")
    parser.add_argument("--tuned", required=True, help="the fully fine-tuned model")
    _add_size(parser)
    _add_targets(parser)
    parser.add_argument(
        "--keep-untargeted",
        action="store_true",
        help="save modules that changed outside the targets (norms, head) whole",
    )
    parser.add_argument("--output", required=True, help="adapter folder to write")


def run_extract(args: argparse.Namespace) -> int:
    """Extract a LoRA adapter from a full fine-tune (SVD of W_tuned - W_base per module).

    Prints each module's rank and relative error, and the parameters that changed outside
    the targets. The adapter is written in PEFT's format.
    """
    from ..io import save_adapter
    from ..lowrank import extract_adapter
    from ..models.load import base_model_name, load_model

    check_size(args.rank, args.energy)
    check_model_spec(args.base, "--base")
    check_model_spec(args.tuned, "--tuned")
    check_adapter_output(args.output)
    base, _ = load_model(args.base)
    tuned, _ = load_model(args.tuned)
    status("extracting: one SVD of W_tuned - W_base per targeted module (minutes for 100M+ models)")
    report = extract_adapter(
        base,
        tuned,
        _targets(args.targets),
        args.rank,
        args.energy,
        keep_untargeted=args.keep_untargeted,
    )
    print(report)
    written = save_adapter(base, args.output, base_model=base_model_name(base))
    print(f"adapter written to {written}")
    return 0


# --- resize ----------------------------------------------------------------------------------
def add_resize_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit resize``."""
    parser.add_argument("adapter", help="adapter folder")
    _add_size(parser)
    parser.add_argument("--base", help="base model (default: the one the adapter names)")
    parser.add_argument("--output", required=True, help="adapter folder to write")


def run_resize(args: argparse.Namespace) -> int:
    """Change a LoRA adapter's rank: the best rank-r pair for each module's delta (SVD).

    Prints each module's old and new rank and the relative error of its delta.
    """
    from ..io import load_adapter, save_adapter
    from ..lowrank import resize_adapter
    from ..models.load import base_model_name, load_model

    check_size(args.rank, args.energy)
    check_adapter_folder(args.adapter, "adapter")
    spec = args.base or args.adapter
    check_model_spec(spec, "--base" if args.base else "the adapter's base model")
    check_adapter_output(args.output)
    model, _ = load_model(spec)
    note_other_base(args.adapter, model.name_or_path)
    load_adapter(model, args.adapter)
    status("resizing: one SVD of each module's delta B A")
    print(resize_adapter(model, args.rank, energy=args.energy))
    written = save_adapter(model, args.output, base_model=base_model_name(model))
    print(f"adapter written to {written}")
    return 0


# --- factorize -------------------------------------------------------------------------------
def add_factorize_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit factorize``."""
    parser.add_argument("--model", required=True, help="model to factorise")
    _add_targets(parser)
    _add_size(parser)
    parser.add_argument("--data", help="JSON/JSONL data file to measure perplexity on")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--max-examples", type=int, default=64, help="examples to measure on")
    parser.add_argument("--output", required=True, help="model folder to write")


def run_factorize(args: argparse.Namespace) -> int:
    """Replace Linear layers by low-rank pairs (down to r, then up), as DeepSeek-V2's MLA.

    Prints parameters and relative error per module and, with --data, the perplexity before
    and after. The folder written loads with lorakit (the layout is in its config.json).
    """
    from ..lowrank.factorize import factorize
    from ..models.load import load_model, save_model_folder

    check_size(args.rank, args.energy)
    check_model_spec(args.model)
    if args.data:
        check_data_file(args.data)
    out = check_empty_output(args.output)
    model, tokenizer = load_model(args.model)

    def measure() -> float:
        return perplexity(model, tokenizer, args.data, args.seq_len, args.max_examples)

    before = measure() if args.data else None
    status("factorizing: one SVD per targeted weight")
    report = factorize(model, _targets(args.targets), args.rank, args.energy)
    print(report)
    if args.data:
        print(f"perplexity on {args.data}: {before:.3f} before, {measure():.3f} after")
    save_model_folder(model, tokenizer, out)
    print(f"model written to {args.output}")
    return 0


# --- inspect ---------------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit inspect``."""
    parser.add_argument("adapter", help="adapter folder")
    parser.add_argument("--base", help="base model: adds how much dW amplifies W's directions")
    parser.add_argument("--plot", help="PNG file for the singular-value spectra")


def run_inspect(args: argparse.Namespace) -> int:
    """Show each adapted module's rank, scale, |dW|, singular values and effective rank.

    With --base, also the LoRA paper's analysis: W projected onto dW's top directions and the
    amplification factor |dW| / |U^T W V|.
    """
    from ..lowrank.inspection import inspect_adapter, plot_spectra
    from ..models.load import load_model

    check_adapter_folder(args.adapter, "adapter")
    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png" or not plot.parent.is_dir():
            raise LoraError(f"--plot {plot}: give a .png file in an existing folder.")
    if args.base:
        check_model_spec(args.base, "--base")
    base = load_model(args.base)[0] if args.base else None
    status("inspecting: an SVD of each module's delta" + (" and of W" if base else ""))
    if base is not None:
        note_other_base(args.adapter, base.name_or_path)
    report = inspect_adapter(args.adapter, base)
    print(report)
    if args.plot:
        status(f"plotting {len(report.modules)} spectra")
        print(f"spectra plotted to {plot_spectra(report, args.plot)}")
    return 0


COMMANDS = {
    "extract": (add_extract_arguments, run_extract),
    "resize": (add_resize_arguments, run_resize),
    "factorize": (add_factorize_arguments, run_factorize),
    "inspect": (add_inspect_arguments, run_inspect),
}
