"""Export adapters to the runtimes people deploy on: llama.cpp (GGUF) and vLLM.

    from lorakit.export import to_gguf, to_gguf_model, check_vllm, to_vllm, export_adapter
    to_gguf(model, "adapter.gguf")                       # a llama.cpp LoRA adapter
    to_gguf_model(model, "model.gguf", outtype="q8_0")   # the whole merged model
    print(check_vllm(model)); to_vllm(model, "vllm/")    # vLLM's loader rules, then a folder
    export_adapter("runs/demo", "gguf", "adapter.gguf")  # the same from an adapter folder

Not imported by ``import lorakit``: it needs the ``gguf`` package (and numpy).
"""

from .folder import export_adapter
from .gguf_adapter import to_gguf
from .gguf_model import to_gguf_model
from .vllm import check_vllm, to_vllm

__all__ = ["check_vllm", "export_adapter", "to_gguf", "to_gguf_model", "to_vllm"]
