"""``lorakit combine``: a new adapter from weighted existing ones."""

from __future__ import annotations

import argparse

from ..errors import LoraError


def parse_named_adapters(values: list[str]) -> dict[str, str]:
    """``["a=DIR1", "b=DIR2"]`` -> ``{"a": "DIR1", "b": "DIR2"}``; a bare DIR is named "default"."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        name, folder = (name, folder) if sep else ("default", value)
        if not name or not folder or name in named:
            raise LoraError(
                f"--adapter {value!r}: give each adapter once as NAME=DIR (e.g. --adapter a=runs/a)."
            )
        named[name] = folder
    return named


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
    from .. import combine, load_adapter, save_adapter
    from ..models import load_model

    adapters = parse_named_adapters(args.adapter)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as err:
            raise LoraError(f"--weights {args.weights!r} must be comma-separated numbers.") from err
        if len(weights) != len(adapters):
            raise LoraError(
                f"--weights has {len(weights)} values for {len(adapters)} adapters; give one each."
            )
    else:
        weights = [1.0 / len(adapters)] * len(adapters)
    model, _ = load_model(args.model or next(iter(adapters.values())))
    for name, folder in adapters.items():
        load_adapter(model, folder, adapter_name=name)
    errors = combine(
        model, dict(zip(adapters, weights, strict=True)), "combined", args.method, args.rank
    )
    save_adapter(model, args.output, "combined")
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


COMMANDS = {"combine": (add_combine_arguments, run_combine)}
