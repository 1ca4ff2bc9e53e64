"""The one Markdown table writer (models/evaluation/tables.py): alignment, empty and None cells,
escaping, and the errors for a malformed table."""

from __future__ import annotations

import pytest

from models.evaluation.tables import markdown_table


def test_header_rule_and_rows_left_aligned_by_default():
    assert markdown_table(["name", "ms"], [["dense", 1.5], ["sparse", "0.25"]]) == [
        "| name | ms |",
        "|---|---|",
        "| dense | 1.5 |",
        "| sparse | 0.25 |",
    ]


def test_one_alignment_for_all_or_one_per_column():
    assert markdown_table(["a", "b"], [], align="right") == ["| a | b |", "|---:|---:|"]
    assert markdown_table(["a", "b", "c"], [[1, 2, 3]], align=("left", "right", "center")) == [
        "| a | b | c |",
        "|---|---:|:---:|",
        "| 1 | 2 | 3 |",
    ]


def test_none_is_a_dash_and_an_empty_string_an_empty_cell():
    assert markdown_table(["a", "b", "c"], [[None, "", 0]])[2] == "| – |  | 0 |"


def test_pipes_are_escaped_and_newlines_become_spaces():
    lines = markdown_table(["x|y"], [["failed: a | b"], ["two\nlines"]])
    assert lines == ["| x\\|y |", "|---|", "| failed: a \\| b |", "| two lines |"]
    assert all(line.replace("\\|", "").count("|") == 2 for line in lines)  # one column in every line


def test_any_value_is_shown_as_its_string():
    assert markdown_table(["v"], [[[1, 2]], [3.0], [True]])[2:] == ["| [1, 2] |", "| 3.0 |", "| True |"]


def test_a_row_of_another_length_is_refused():
    with pytest.raises(ValueError, match="row 1 has 3 cells, the table has 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [1, 2, 3]])


def test_an_unknown_or_miscounted_alignment_is_refused():
    with pytest.raises(ValueError, match=r"align must be one of \['center', 'left', 'right'\], got \['middle'\]"):
        markdown_table(["a"], [], align="middle")
    with pytest.raises(ValueError, match=r"align must give one alignment per column \(2\), got 1"):
        markdown_table(["a", "b"], [], align=["left"])
