"""Regenerate the llama.cpp references: tests/data/llamacpp_lora/ and tests/data/llamacpp_merged/.

    .venv/bin/python scripts/make_gguf_reference.py            # both
    .venv/bin/python scripts/make_gguf_reference.py merged     # merged models only

tests/data/llamacpp_lora (an adapter):

1. a 2-layer Llama (tests/tiny.py) gets a rank-4 LoRA (alpha 8) on its seven projections,
   B random; its config goes to base/ and the adapter to adapter/;
2. the llama-cpp-python sdist (it vendors llama.cpp) is downloaded once into
   ``lorakit.models.gguf.cache_dir() / "llama-cpp"`` with pip;
3. llama.cpp's ``convert_lora_to_gguf.py --base base --outtype f32`` writes reference.gguf;
4. provenance.json records the versions, the command and the checksums.

tests/test_export.py checks that lorakit's export of adapter/ equals reference.gguf byte for
byte.

tests/data/llamacpp_merged (merged models, one per family of tests/export_families.py):

1. two SentencePiece models are trained on the demo data (``sentencepiece``): llama-spm.model
   and gemma-spm.model (kept: later runs reuse them, so the references stay put);
2. per family, a tiny base (exact weights) and a rank-4 adapter are saved, ``lorakit merge``
   folds the adapter in, and the base's tokenizer.model is copied beside the merged folder's
   tokenizer.json (a Hugging Face folder ships both; transformers 5 saves the latter only);
3. llama.cpp's ``convert_hf_to_gguf.py MERGED --outtype f32`` writes the reference GGUF, and
   <family>.json keeps its keys and tensor digests (export_families.summarize), not the file;
4. provenance.json records the versions and commands.

tests/test_export_merged.py compares lorakit's ``export --merged`` of the same adapter with
each. Needs network once (PyPI) for the sdist; the tests themselves never do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "llamacpp_lora"
MERGED = ROOT / "tests" / "data" / "llamacpp_merged"
VERSION = "0.3.36"  # llama-cpp-python; keep in step with the Makefile's interop target
sys.path.insert(0, str(ROOT / "tests"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_cpp_source() -> tuple[Path, Path]:
    """(sdist, vendored llama.cpp folder), downloading the sdist once."""
    from lorakit.models.gguf import cache_dir

    cache = cache_dir() / "llama-cpp"
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
    source = cache / f"llama_cpp_python-{VERSION}"
    if not source.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    return sdist, source / "vendor" / "llama.cpp"


def make_adapter() -> None:
    """base/config.json and adapter/ (rank 4, alpha 8, seven projections, B random)."""
    import tiny

    from lorakit import LoraConfig, add_lora, save_adapter

    model = tiny.llama()
    model.config.architectures = [type(model).__name__]  # what the converter dispatches on
    model.config.save_pretrained(OUT / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    tiny.randomize_adapters(model)
    save_adapter(model, OUT / "adapter")


def make_adapter_reference(sdist: Path, llama_cpp: Path) -> None:
    """tests/data/llamacpp_lora: the adapter and convert_lora_to_gguf.py's GGUF of it."""
    make_adapter()
    command = [
        "convert_lora_to_gguf.py",
        "--base",
        "base",
        "--outtype",
        "f32",
        "--outfile",
        "reference.gguf",
        "adapter",
    ]
    script = str(llama_cpp / command[0])
    subprocess.run([sys.executable, script, *command[1:]], cwd=OUT, check=True)
    provenance = {
        "producer": f"llama.cpp convert_lora_to_gguf.py vendored in llama-cpp-python {VERSION}",
        "sdist": sdist.name,
        "sdist_sha256": sha256(sdist),
        "command (in this folder)": "python " + " ".join(command),
        "reference.gguf_sha256": sha256(OUT / "reference.gguf"),
        "adapter": "tests/tiny.py llama(), LoraConfig(r=4, alpha=8, seven projections), "
        "tiny.randomize_adapters; see scripts/make_gguf_reference.py",
    }
    (OUT / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {OUT}")


def make_spm_models() -> None:
    """llama-spm.model and gemma-spm.model: BPE SentencePiece models of 400 pieces with byte
    fallback, trained on the demo conversations (once; kept afterwards)."""
    import sentencepiece

    corpus = MERGED / "corpus.txt"
    lines = []
    for split in ("train", "val"):
        for line in (ROOT / "src" / "lorakit" / "demo" / f"{split}.jsonl").open():
            lines += [m["content"] for m in json.loads(line)["messages"]]
    corpus.write_text("\n".join(lines))
    common = {
        "input": str(corpus),
        "vocab_size": 400,
        "model_type": "bpe",
        "byte_fallback": True,
        "character_coverage": 1.0,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "split_digits": True,
        "num_threads": 1,
    }
    models = {
        "llama-spm": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        "gemma-spm": {
            **{"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "add_dummy_prefix": False},
            **{"bos_piece": "<bos>", "eos_piece": "<eos>", "pad_piece": "<pad>"},
            "control_symbols": ["<mask>", "<start_of_turn>", "<end_of_turn>"],
        },
    }
    for name, options in models.items():
        if not (MERGED / f"{name}.model").is_file():
            prefix = str(MERGED / name)
            sentencepiece.SentencePieceTrainer.train(model_prefix=prefix, **common, **options)
            (MERGED / f"{name}.vocab").unlink()
    corpus.unlink()


# transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer, which splits with Qwen2's
# regex whatever tokenizer.json says; the converter names a pre-tokenizer by hashing the ids of a
# probe text against real tokenizers, and SmolLM2's vocabulary under Qwen2's regex is none of
# them. For such a family the converter runs with the name of the regex transformers applies.
UNHASHED_PRE = {"qwen2": "qwen2"}
CONVERT = """
import runpy, sys
folder, script, pre = sys.argv[1:4]
sys.path[:0] = [folder, folder + "/gguf-py"]
sys.argv = [script, *sys.argv[4:]]
from conversion import base
hashed = base.TextModel.get_vocab_base_pre
def named(self, tokenizer):
    try:
        return hashed(self, tokenizer)
    except NotImplementedError:
        if not pre:
            raise
        return pre
base.TextModel.get_vocab_base_pre = named
runpy.run_path(script, run_name="__main__")
"""


def _tokenizer():
    from lorakit.models.load import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)[1]


def make_merged_references(sdist: Path, llama_cpp: Path) -> None:
    """tests/data/llamacpp_merged/<family>.json: convert_hf_to_gguf.py on lorakit merge."""
    import tempfile

    import export_families

    from lorakit.cli import main as lorakit

    MERGED.mkdir(parents=True, exist_ok=True)
    make_spm_models()
    tokenizer = _tokenizer()
    commands = {}
    for name in export_families.FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            base = export_families.base_folder(name, work / "base", tokenizer)
            adapter = export_families.adapter_folder(name, base, work / "adapters" / name)
            merged = work / "merged" / name
            lorakit(["merge", "--adapter", str(adapter), "--output", str(merged)])
            if (base / "tokenizer.model").is_file():
                shutil.copy(base / "tokenizer.model", merged / "tokenizer.model")
            out = work / f"{name}.gguf"
            command = ["convert_hf_to_gguf.py", "--outtype", "f32", "--outfile", str(out)]
            script = str(llama_cpp / command[0])
            pre = UNHASHED_PRE.get(name, "")
            run = [sys.executable, "-c", CONVERT, str(llama_cpp), script, pre]
            subprocess.run([*run, *command[1:], str(merged)], check=True)
            summary = export_families.summarize(out)
            (MERGED / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
            commands[name] = f"python {' '.join(command[:-2])} --outfile {name}.gguf merged/{name}"
    provenance = {
        "producer": f"llama.cpp convert_hf_to_gguf.py vendored in llama-cpp-python {VERSION}",
        "sdist": sdist.name,
        "sdist_sha256": sha256(sdist),
        "models": "tests/export_families.py: base_folder + adapter_folder, then lorakit merge "
        "(tokenizer.model copied beside the merged tokenizer.json)",
        "commands": commands,
        "pre-tokenizer named where the converter's hash table has none": UNHASHED_PRE,
        "tokenizers": {n: sha256(MERGED / f"{n}.model") for n in ("llama-spm", "gemma-spm")},
    }
    (MERGED / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {MERGED}")


def main() -> None:
    sdist, llama_cpp = llama_cpp_source()
    if sys.argv[1:] != ["merged"]:
        make_adapter_reference(sdist, llama_cpp)
    make_merged_references(sdist, llama_cpp)


if __name__ == "__main__":
    main()
