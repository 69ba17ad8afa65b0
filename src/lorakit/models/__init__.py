"""Loading base models: Hugging Face folders, GGUF files, the bundled default, precision.

- ``load``: model specs (a folder, a ``.gguf`` file, ``smollm2-135m``), loading with the
  adapters' base resolved, merged model folders;
- ``gguf``: the bundled SmolLM2 GGUF and the cache of GGUF files converted to Hugging Face
  folders (what adapters record as their base);
- ``precision``: ``--dtype`` and ``--quantize`` (bitsandbytes) settings.
"""
