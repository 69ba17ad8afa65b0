"""Fine-tuning data: reading files, chat templates, prompt masking, truncation, packing, batches.

- ``records``: JSON/JSONL files in four formats (alpaca, chat, sharegpt, text), each record
  checked as it is read and named by file and line;
- ``templates``: chat template files, checked to compile;
- ``encode``: tokens and labels (loss on the replies only), truncation, packing, batches;
- ``datasets``: training and validation sets from files, with a seeded split.
"""

from .datasets import common_system, load_datasets, split_examples, with_system
from .encode import IGNORE_INDEX, EncodedDataset, collate, encode_examples
from .records import (
    FORMATS,
    Conversation,
    DataFile,
    Example,
    read_data,
    read_examples,
    skip_report,
)
from .templates import check_chat_template, read_chat_template

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Conversation",
    "DataFile",
    "EncodedDataset",
    "Example",
    "check_chat_template",
    "collate",
    "common_system",
    "encode_examples",
    "load_datasets",
    "read_chat_template",
    "read_data",
    "read_examples",
    "skip_report",
    "split_examples",
    "with_system",
]
