"""Loading base models: Hugging Face folders, GGUF files, the bundled default, precision.

- ``load``: model specs (a folder, a ``.gguf`` file, ``smollm2-135m``), loading with the
  adapters' base resolved, merged model folders;
- ``precision``: ``--dtype`` and ``--quantize`` (bitsandbytes) settings.
"""
