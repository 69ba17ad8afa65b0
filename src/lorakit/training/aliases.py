"""What other fine-tuning tools call the settings of ``lorakit train``, and the valid key
nearest to a wrong one (for the refusal of unknown YAML keys and flags)."""

from __future__ import annotations

import difflib

# What other fine-tuning tools (Hugging Face Trainer, PEFT, axolotl) call these settings.
ALIASES = {
    "learning_rate": "lr",
    "r": "rank",
    "lora_r": "rank",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "seq_len",
    "max_length": "seq_len",
    "sequence_len": "seq_len",
    "cutoff_len": "seq_len",
    "output_dir": "output",
    "model_name_or_path": "model",
    "base_model": "model",
    "train_file": "data",
    "dataset": "data",
    "validation_file": "val_data",
    "lr_scheduler_type": "schedule",
    "warmup": "warmup_steps",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": "resume",
    "system_prompt": "system",
    "task": "tasks",
}


def suggest_key(name: str, names: list[str]) -> str | None:
    """The valid key closest to ``name``: another tool's name for it, or a near spelling."""
    key = name.replace("-", "_").lower()
    if ALIASES.get(key) in names:
        return ALIASES[key]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return close[0] if close else None
