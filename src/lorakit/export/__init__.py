"""Export adapters to the runtimes people deploy on: llama.cpp (GGUF) and vLLM.

    from lorakit.export import to_gguf, to_gguf_model, verify_gguf, check_vllm, to_vllm
    to_gguf(model, "adapter.gguf")                       # a llama.cpp LoRA adapter
    to_gguf_model(model, "model.gguf", outtype="q8_0")   # the whole merged model
    print(verify_gguf(merged, "model.gguf"))             # read back against the merged model
    print(check_vllm(model)); to_vllm(model, "vllm/")    # vLLM's loader rules, then a folder
    export_adapter("runs/demo", "gguf", "adapter.gguf")  # the same from an adapter folder

A merged model of a Hugging Face base gets its tokenizer and hyperparameters from the base's
own config and tokenizer (``hparams``, ``vocab``), no llama.cpp needed; ``ollama`` writes a
Modelfile beside a GGUF. Not imported by ``import lorakit``: it needs the ``gguf`` package
(and numpy).
"""

from .folder import export_adapter
from .gguf_adapter import to_gguf
from .gguf_model import to_gguf_model
from .verify import verify_gguf
from .vllm import check_vllm, to_vllm

__all__ = ["check_vllm", "export_adapter", "to_gguf", "to_gguf_model", "to_vllm", "verify_gguf"]
