"""Terminal tables: padded columns, numbers right-aligned so their digits line up."""

from lorakit.tables import format_table


def test_numbers_right_aligned_text_left_aligned():
    lines = format_table(
        [
            ("module", "r", "error", "sigma"),
            ("q_proj", "8", "0.5", "1.2 0.3"),
            ("model.layers.10.mlp", "16", "12.25", "10 2"),
        ]
    )
    assert lines == [
        "module                r  error    sigma",
        "-------------------  --  -----  -------",
        "q_proj                8    0.5  1.2 0.3",
        "model.layers.10.mlp  16  12.25     10 2",
    ]


def test_a_column_with_text_stays_left_aligned():
    lines = format_table([("a", "b"), ("1", "full copy"), ("22", "3")])
    assert lines[2] == " 1  full copy"
    assert lines[3] == "22  3"
