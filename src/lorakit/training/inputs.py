"""A run's inputs, read and checked before any model loads: data, templates, resume point.

Every cheap check of ``lorakit train`` lives here, so bad input fails in a second, not after
a model load; what it reads (the generation settings, the test records) is handed down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import Example, common_system, read_chat_template, read_data, with_system
from ..data.tables import is_saved_dataset
from ..errors import LoraError
from ..generate import GenerationSettings, split_references
from ..models.load import resolve_model_spec
from .config import TrainConfig
from .run_folder import check_output, latest_checkpoint
from .trackers import check_trackers

DEFAULT = "default"  # the adapter's name in a single-task run


@dataclass
class Inputs:
    """What :func:`check_inputs` read and checked, before any model loads.

    Attributes:
        settings: per adapter name, the generation settings saved beside it (the system
            prompt given, or the one its training conversations share, and the template).
        test_examples: the ``test_data`` records (conversations), if any.
        resume_dir: the checkpoint ``resume`` points to, if any.
    """

    settings: dict[str, GenerationSettings]
    test_examples: list[Example] | None
    resume_dir: Path | None


def _read(path: str, flag: str, config: TrainConfig) -> list[Example]:
    if not Path(path).is_file() and not is_saved_dataset(path):
        what = "a folder, not a file" if Path(path).is_dir() else "file not found"
        raise LoraError(
            f"{flag} {path}: {what}; pass an existing JSON/JSONL, CSV or Parquet file, or a "
            "datasets save_to_disk folder."
        )
    return read_data(path, config.format, skip_bad_records=config.skip_bad_records).examples


def check_inputs(config: TrainConfig, check_model: bool = True) -> Inputs:
    """Every cheap check of a run, so that bad input fails in a second, not after a model load.

    Reads every data file (format and records), the chat template file, the test records
    (they need reference replies), finds the checkpoint to resume from and, with
    ``check_model``, resolves the model spec.

    Raises:
        LoraError: naming the flag and the problem.
    """
    if check_model:
        try:
            resolve_model_spec(config.model)
        except LoraError as error:
            raise LoraError(f"--model {config.model}: {error}") from None
    template = None
    if config.chat_template is not None:
        template = read_chat_template(config.chat_template)
    settings = {}
    for name, path in (config.task_files() or {DEFAULT: config.data}).items():
        examples = _read(path, "--task" if config.tasks else "--data", config)
        system = config.system if config.system is not None else common_system(examples)
        settings[name] = GenerationSettings(system or None, template)
    if config.val_data:
        _read(config.val_data, "--val-data", config)
    test = None
    if config.test_data:
        examples = _read(config.test_data, "--test-data", config)
        test = [with_system(e, config.system) for e in examples]
        split_references(test)  # exact match needs a reference reply in every record
    check_trackers([*config.report_to, *(["tensorboard"] if config.tensorboard else [])])
    resume_dir = latest_checkpoint(config.resume) if config.resume else None
    check_output(Path(config.output))
    return Inputs(settings, test, resume_dir)
