"""Loading a vision-language model folder and its processor, offline.

A VLM folder is one whose ``config.json`` has a ``vision_config``; it loads with
``AutoModelForImageTextToText``. Its processor loads with ``AutoProcessor`` when it can. Some
processors (Qwen2-VL, InternVL, SmolVLM) always build a video processor, which needs
torchvision; where torchvision is missing or broken, the processor is assembled from the
folder's image processor (the PIL one), its tokenizer and ``processor_config.json``, without
video support, which fine-tuning on images never uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoraError


def is_vlm_folder(spec: str | Path) -> bool:
    """Whether ``spec`` is a model folder whose config has a vision part."""
    config = Path(spec) / "config.json"
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def images_only(processor_class: type) -> type:
    """``processor_class`` accepting ``video_processor=None`` (images only, no torchvision).

    transformers checks every sub-processor's class, and the video processor's base class is a
    placeholder without torchvision; images alone never touch it.
    """

    def check(self: Any, name: str, arg: Any) -> Any:
        if arg is None and name == "video_processor":
            return None
        return processor_class.check_argument_for_proper_class(self, name, arg)

    return type(
        processor_class.__name__, (processor_class,), {"check_argument_for_proper_class": check}
    )


def load_processor(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """The folder's processor: ``AutoProcessor``, else assembled without a video processor.

    Raises:
        LoraError: the folder has no processor files lorakit can read.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    try:
        processor = AutoProcessor.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ImportError, AttributeError, TypeError, ValueError):
        # A video processor that needs torchvision; build the rest by hand below.
        config = _read_json(folder / "processor_config.json")
        cls = getattr(transformers, str(config.pop("processor_class", "")), None)
        if cls is None:
            raise LoraError(
                f"{folder}: cannot load its processor (AutoProcessor failed and "
                "processor_config.json names no processor class transformers has)."
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        parts = {"image_processor": image_processor, "tokenizer": tokenizer}
        if "video_processor" in cls.get_attributes():
            parts["video_processor"] = None
        known = set(cls.__init__.__code__.co_varnames)
        kwargs = {k: v for k, v in config.items() if k in known and k not in parts}
        processor = images_only(cls)(**parts, **kwargs)
    processor.tokenizer.padding_side = "right"  # training pads on the right
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def load_vlm(
    spec: str | Path, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """``(model, processor)`` of a VLM folder, the model in eval mode on the CPU.

    Raises:
        LoraError: not a VLM folder, or a folder with its own code (unless
            ``trust_remote_code``).
    """
    from transformers import AutoModelForImageTextToText

    from ..models.load import check_remote_code
    from ..models.precision import resolve_dtype

    folder = Path(spec)
    if not is_vlm_folder(folder):
        raise LoraError(
            f"{spec} is not a vision-language model folder (its config.json has no "
            "vision_config); image data needs one that AutoModelForImageTextToText loads."
        )
    check_remote_code(folder, trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype, "cpu"),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    model.name_or_path = model.config.name_or_path = str(folder)
    return model.eval(), load_processor(folder, trust_remote_code)
