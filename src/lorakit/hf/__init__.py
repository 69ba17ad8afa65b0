"""The Hugging Face road: what transformers, PEFT and their trainers see of lorakit adapters.

- ``peft_form``: a model's adapter as PEFT's file holds it (tensor names, the JSON's facts of
  the model: base, task type); below ``inject``, so ``add_lora`` can hand transformers its save;
- ``integration``: the adapter-integration attributes ``add_lora`` gives a transformers model,
  so that ``save_pretrained``, ``Trainer`` and TRL write PEFT adapter folders;
- ``trainer``: ``AdapterCheckpoints``, the Trainer mixin that resumes from those folders and
  loads the best one (transformers does both only for PEFT's own ``PeftModel``).

Nothing is imported here: the modules sit at different levels of the package.
"""
