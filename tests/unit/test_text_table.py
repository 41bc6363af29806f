"""graphlora.text_table.format_table: the one fixed-width formatter of the text reports."""

import pytest

from graphlora.text_table import format_table


def test_columns_are_as_wide_as_their_widest_cell():
    assert format_table([("a", "bb"), ("ccc", "d")]) == ["a    bb", "ccc  d "]


def test_right_aligned_columns_and_a_free_last_column():
    rows = [("component", "sites", "reason"), ("vision", "12", "x"), ("total", "7", "a longer reason")]
    assert format_table(rows, align="lr", pad_last=False) == [
        "component  sites  reason", "vision        12  x", "total          7  a longer reason"]


def test_rows_of_other_lengths_are_refused():
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table([("a", "b"), ("c",)])
    assert format_table([]) == []
