"""Tables as data (lorakit.data.tables): CSV, Parquet and save_to_disk folders through
``datasets``, the same format detection and checks as JSON, errors named by row."""

from __future__ import annotations

import json
import sys

import pytest

from lorakit import LoraError
from lorakit.data.files import read_data

CHATS = [
    [{"role": "user", "content": f"Order {i}?"}, {"role": "assistant", "content": f"pizza {i}"}]
    for i in range(3)
]


def _parquet(rows, path):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_alpaca_csv_rows_are_records_and_an_empty_cell_a_missing_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "instruction,input,output\nName a colour,,red\nAdd,2 and 3,5\n", encoding="utf-8"
    )
    data = read_data(path)
    assert data.sources == [f"{path}, row 1", f"{path}, row 2"]
    assert data.examples == [
        [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}],
        [
            {"role": "user", "content": "Add\n\n2 and 3"},
            {"role": "assistant", "content": "5"},
        ],
    ]


def test_chat_in_csv_cells_parquet_and_save_to_disk_read_as_the_jsonl(tmp_path):
    from datasets import Dataset, DatasetDict

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    csv = tmp_path / "chat.csv"
    Dataset.from_list([{"messages": json.dumps(m)} for m in CHATS]).to_csv(str(csv))
    parquet = _parquet([{"messages": m} for m in CHATS], tmp_path / "chat.parquet")
    saved = tmp_path / "saved"
    Dataset.from_list([{"messages": m} for m in CHATS]).save_to_disk(str(saved))
    splits = tmp_path / "splits"
    DatasetDict({"train": Dataset.from_list([{"messages": m} for m in CHATS])}).save_to_disk(
        str(splits)
    )
    expected = read_data(jsonl).examples
    assert expected == CHATS
    for path in (csv, parquet, saved, splits):
        assert read_data(path).examples == expected, path
    assert read_data(splits).sources[2] == f"{splits} [train], row 3"


def test_a_bad_row_is_named_by_its_row_number(tmp_path):
    rows = [{"messages": m} for m in CHATS]
    rows[1] = {"messages": [{"role": "assistant", "content": "no question first"}]}
    path = _parquet(rows, tmp_path / "bad.parquet")
    with pytest.raises(LoraError, match=r"bad\.parquet, row 2: .*user"):
        read_data(path)
    data = read_data(path, skip_bad_records=True)
    assert len(data.examples) == 2 and sum(data.skipped.values()) == 1


def test_a_csv_turns_cell_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}"\n')
    with pytest.raises(LoraError, match=r"chat\.csv, row 1: the messages cell is not JSON"):
        read_data(path)


def test_a_table_with_unknown_columns_names_them(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("question,answer\nhi,there\n")
    with pytest.raises(LoraError, match=r"odd\.csv, row 1: cannot tell the data format.*question"):
        read_data(path)


def test_a_split_folder_without_train_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "splits"
    DatasetDict({"test": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(folder))
    with pytest.raises(LoraError, match=r"splits test and no 'train'.*splits/test"):
        read_data(folder)


def test_an_unreadable_table_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is no parquet")
    with pytest.raises(LoraError, match=r"Cannot read .*broken\.parquet as PARQUET"):
        read_data(path)


def test_without_datasets_the_error_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(LoraError, match=r"pip install datasets"):
        read_data(path)


def test_json_files_never_import_datasets(tmp_path):
    import subprocess

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    code = (
        "import sys\nfrom lorakit.data.files import read_data\n"
        f"read_data({str(path)!r})\nprint('datasets' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_a_field_arrow_adds_to_other_rows_turns_stays_missing(tmp_path):
    rows = [{"messages": m} for m in CHATS]
    rows[0] = {"messages": [{"role": "system", "content": "Be brief."}, *CHATS[0]]}
    rows[1] = {"messages": [{**CHATS[1][0], "name": "ann"}, CHATS[1][1]]}  # a key only here
    path = _parquet(rows, tmp_path / "mixed.parquet")
    records = read_data(path).examples
    assert records[2] == CHATS[2], "no 'name': None in the turns of rows without one"
