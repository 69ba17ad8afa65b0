"""``lorakit combine``: a new adapter from weighted existing ones."""

from __future__ import annotations

import argparse

from ..errors import LoraError
from .common import (
    check_adapter_folder,
    check_adapter_output,
    check_model_spec,
    load_adapters,
    model_name,
    parse_named_adapters,
)


def add_combine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model (default: the first adapter's base model)")
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an adapter to combine; repeat",
    )
    parser.add_argument(
        "--weights",
        help="comma-separated weights in --adapter order (default: equal, summing to 1)",
    )
    parser.add_argument(
        "--method", choices=["cat", "svd", "linear"], default="cat", help="how to combine"
    )
    parser.add_argument("--rank", type=int, help="rank of the result (method svd)")
    parser.add_argument("--output", required=True, help="folder for the combined adapter")


def run_combine(args: argparse.Namespace) -> int:
    """Combine weighted adapters into one (cat: exact; svd: truncated to --rank; linear)."""
    from .. import combine, save_adapter
    from ..models.load import base_model_name, load_model

    adapters = parse_named_adapters(args.adapter)
    for folder in adapters.values():
        check_adapter_folder(folder)
    check_adapter_output(args.output)
    weights = _weights(args.weights, len(adapters))
    if args.method == "svd" and (args.rank is None or args.rank <= 0):
        raise LoraError("--method svd needs --rank N (a positive integer): the rank to keep.")
    spec = args.model or next(iter(adapters.values()))
    check_model_spec(spec, "--model" if args.model else "the first adapter's base model")
    model, _ = load_model(spec)
    load_adapters(model, adapters, model_name(model, spec))
    errors = combine(
        model, dict(zip(adapters, weights, strict=True)), "combined", args.method, args.rank
    )
    save_adapter(model, args.output, "combined", base_model=base_model_name(model))
    print(
        f"combined {dict(zip(adapters, weights, strict=True))} with method={args.method} -> {args.output}"
    )
    if errors:
        worst = max(errors, key=errors.get)
        mean = sum(errors.values()) / len(errors)
        print(
            f"relative error of the rank-{args.rank} truncation: mean {mean:.2e}, max {errors[worst]:.2e} ({worst})"
        )
    return 0


def _weights(text: str | None, count: int) -> list[float]:
    """``--weights`` as numbers, one per adapter; equal weights summing to 1 by default."""
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as err:
        raise LoraError(f"--weights {text!r} must be comma-separated numbers.") from err
    if len(weights) != count:
        raise LoraError(f"--weights has {len(weights)} values for {count} adapters; give one each.")
    return weights


COMMANDS = {"combine": (add_combine_arguments, run_combine)}
