"""Fine-tuning data: reading files, chat templates, prompt masking, truncation, packing, batches.

- ``files``: a data file's format (alpaca, chat, sharegpt, text, images), detected or given;
- ``records``: JSON/JSONL records and the text formats' parsers, each record checked as it is
  read and named by file and line;
- ``images``: image records, conversations whose user turns carry their images;
- ``templates``: chat template files, checked to compile;
- ``encode``: tokens and labels (loss on the replies only), truncation, packing, batches;
- ``datasets``: training and validation sets from files, with a seeded split;
- ``demo``: the bundled demo task.
"""

from .datasets import common_system, load_datasets, split_examples, with_system
from .encode import IGNORE_INDEX, EncodedDataset, collate, encode_examples
from .files import FORMATS, read_data, read_examples
from .images import IMAGE, images_of
from .records import Conversation, DataFile, Example, skip_report
from .templates import check_chat_template, read_chat_template

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "IMAGE",
    "Conversation",
    "DataFile",
    "EncodedDataset",
    "Example",
    "check_chat_template",
    "collate",
    "common_system",
    "encode_examples",
    "images_of",
    "load_datasets",
    "read_chat_template",
    "read_data",
    "read_examples",
    "skip_report",
    "split_examples",
    "with_system",
]
