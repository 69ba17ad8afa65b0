"""No stale references: every repository path named in the README, the docs, the Makefile or
a ``--help`` text exists, and every ``make`` target the README names is in the Makefile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorakit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
TOP = ("docs", "benchmarks", "scripts", "tests", "src")
# A path under one of the top folders, and the character after it: a name followed by <, * or {
# is a pattern (benchmarks/results/bench-<time>.json), not a file.
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./-]*)(.?)")
FOREIGN = {"tests/test_custom_models.py"}  # PEFT's own test file, named in the README
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOCS = ["README.md", "Makefile", "benchmarks/README.md"]
DOCS += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def help_texts() -> dict[str, str]:
    """``lorakit --help`` and every ``lorakit COMMAND --help``, by command."""
    parser = build_parser()
    texts = {"lorakit": parser.format_help()}
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            texts[name] = sub.format_help()
    return texts


def missing_paths(text: str, base: Path) -> list[str]:
    """Repository paths and relative Markdown links in ``text`` that do not exist."""
    paths = [path.rstrip(".-") for path, after in PATH.findall(text) if after not in list("<*{")]
    missing = [p for p in paths if p not in FOREIGN and not (ROOT / p).exists()]
    for target in LINK.findall(text):
        if "://" not in target and not (base / target).exists():
            missing.append(target)
    return missing


@pytest.mark.parametrize("name", DOCS)
def test_paths_in_docs_exist(name):
    path = ROOT / name
    assert missing_paths(path.read_text(), path.parent) == []


def test_paths_in_help_texts_exist():
    texts = help_texts()
    assert "docs/distributed.md" in " ".join(texts["train"].split())  # the pattern finds them
    missing = {cmd: missing_paths(" ".join(t.split()), ROOT) for cmd, t in texts.items()}
    assert {cmd: paths for cmd, paths in missing.items() if paths} == {}


def test_layout_lists_existing_modules():
    block = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    names = re.findall(r"^  (\S+)\s", block, flags=re.MULTILINE)
    assert len(names) > 10
    assert [n for n in names if not (ROOT / "src" / "lorakit" / n).exists()] == []
    # ... and every module and package of the top level is in it, so that a newcomer can
    # name what each owns.
    package = ROOT / "src" / "lorakit"
    present = {p.name + ("/" if p.is_dir() else "") for p in package.iterdir()}
    present = {n for n in present if n.endswith((".py", "/")) and not n.startswith("__")}
    present -= {"demo/"}  # the bundled demo data, not code
    assert sorted(present - set(names)) == []


def test_make_targets_named_in_the_readme_exist():
    makefile = ROOT.joinpath("Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"`make (\w+)`", ROOT.joinpath("README.md").read_text()))
    assert named and named <= targets


def test_the_pattern_catches_a_stale_path():
    assert missing_paths("run benchmarks/bench_train.py, see docs/nope.md", ROOT) == [
        "benchmarks/bench_train.py",
        "docs/nope.md",
    ]
    assert missing_paths("written to benchmarks/results/bench-<time>.json", ROOT) == []
    assert missing_paths("[the doc](docs/missing.md)", ROOT) == [
        "docs/missing.md",
        "docs/missing.md",
    ]


def test_help_states_each_default_once():
    # A flag whose help names its default must not get argparse's "(default: None)" as well.
    doubled = {
        cmd: re.findall(r"\(default: [^)]*\) \(default: [^)]*\)", " ".join(text.split()))
        for cmd, text in help_texts().items()
    }
    assert {cmd: found for cmd, found in doubled.items() if found} == {}
    assert "(default: cat)" in " ".join(help_texts()["combine"].split())  # others still shown


# --- the demo transcript in the README: the lines that do not depend on the machine ----------

DEMO = re.compile(r"/[^ ,]*/lorakit/demo/")  # the package's path, as the README elides it


def demo_transcript() -> list[str]:
    """The lines of the README's `make demo` transcript."""
    readme = ROOT.joinpath("README.md").read_text()
    return readme.split("One run of `make demo`", 1)[1].split("```", 2)[1].strip("\n").split("\n")


def _table(lines: list[str]) -> list[str]:
    """What ``print_table`` prints for the figures in the README's table (they move with the
    CPU); its layout, row names and note do not."""
    import contextlib
    import io

    from lorakit.training.report import print_table

    figures = {line[:22].strip(): line[22:].split() for line in lines[1:4]}
    (b, a), (v0, v1), (_, shape) = (figures[k] for k in figures)
    hits, total = map(int, shape.split("/"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        print_table(
            {"exact_match": int(b.rstrip("%")) / 100},
            {"exact_match": int(a.rstrip("%")) / 100},
            {0: float(v0), 40: float(v1)},
            (hits, total),
        )
    return printed.getvalue().split("\n")[1:-2]


def test_demo_transcript_is_what_train_prints(smollm2):
    import copy

    from lorakit import add_lora
    from lorakit.data import common_system, load_datasets, read_data
    from lorakit.inject import trainable_parameters
    from lorakit.modality import TEXT
    from lorakit.training.config import resolve_config
    from lorakit.training.distributed import Dist
    from lorakit.training.loop import SHAPE_CHECKS
    from lorakit.training.report import describe, describe_parallel, short

    lines = demo_transcript()
    config = resolve_config(None, {"output": "runs/demo"})  # what `make demo` runs
    model, tokenizer = smollm2
    train, val = load_datasets(
        config.data, TEXT.codec(tokenizer), config.seq_len, val_path=config.val_data
    )
    adapted = add_lora(copy.deepcopy(model), config.lora_config("smollm2-135m"))
    system = common_system(read_data(config.data).examples)
    steps = range(0, config.max_steps + 1, config.eval_every)
    table = lines[len(steps) + 7 : len(steps) + 12]
    expected = [
        DEMO.sub(".../lorakit/demo/", describe(config)),
        f"train: {train.summary()}",
        f"val:   {val.summary()}",
        "base model exact match on .../lorakit/demo/test.jsonl: 0.0%",
        str(trainable_parameters(adapted)),
        describe_parallel(config, Dist()),
        *(f"step {s}: eval loss {lines[6 + i].rsplit(' ', 1)[-1]}" for i, s in enumerate(steps)),
        "",
        *_table(table),
        "",
        f"adapter written to {config.output}",
        f"saved with it: the system prompt {short(system)}",
        f"done: {config.max_steps} steps, adapter in {config.output}",
    ]
    assert lines == expected
    assert table[3].endswith(f"/{SHAPE_CHECKS}")  # the count of requests is not a figure
    for line in lines[6 : 6 + len(steps)]:  # the losses themselves move with the CPU
        assert re.fullmatch(r"step \d+: eval loss \d\.\d{4}", line), line
