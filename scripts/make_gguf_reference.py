"""Regenerate tests/data/llamacpp_lora/: a tiny adapter and llama.cpp's own GGUF of it.

    .venv/bin/python scripts/make_gguf_reference.py

1. a 2-layer Llama (tests/tiny.py) gets a rank-4 LoRA (alpha 8) on its seven projections,
   B random; its config goes to base/ and the adapter to adapter/;
2. the llama-cpp-python sdist (it vendors llama.cpp) is downloaded once into
   ``lorakit.models.gguf.cache_dir() / "llama-cpp"`` with pip;
3. llama.cpp's ``convert_lora_to_gguf.py --base base --outtype f32`` writes reference.gguf;
4. provenance.json records the versions, the command and the checksums.

tests/test_export.py checks that lorakit's export of adapter/ equals reference.gguf byte for
byte. Needs network once (PyPI) for the sdist; the test itself never does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "llamacpp_lora"
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


def main() -> None:
    make_adapter()
    sdist, llama_cpp = llama_cpp_source()
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


if __name__ == "__main__":
    main()
