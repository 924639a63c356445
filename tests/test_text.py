"""``bnfold.text``: the one table and wrapping helper every renderer uses."""

from __future__ import annotations

from bnfold.text import labelled, paint, table, wrap


def test_columns_are_as_wide_as_their_widest_cell_and_lines_have_no_trailing_spaces():
    lines = table([["name", "n", "note"], ["a.long.name", "12", ""], ["b", "3", "ok"]])
    assert lines == ["name         n   note", "a.long.name  12", "b            3   ok"]


def test_right_aligned_column_gap_and_rule_across_the_table():
    lines = table(
        [["Layer", "Scale"], ["conv", "1.5"], ["conv2", "31600"]], gap=3, right={1}, rule="─"
    )
    assert lines == ["Layer   Scale", "─" * 13, "conv      1.5", "conv2   31600"]


def test_a_narrow_column_wraps_between_words_and_never_cuts_a_word():
    rows = [["BatchNorm", "Reason"], ["bn1", "residual fan-out of a layer"]]
    lines = table(rows, widths=[9, 12])
    assert lines == [
        "BatchNorm  Reason",
        "bn1        residual",
        "           fan-out of a",
        "           layer",
    ]
    assert table([["x", "y"], ["a", "incomprehensibilities"]], widths=[1, 5])[1].endswith("s")


def test_styles_paint_data_rows_and_the_header_bold():
    lines = table([["a"], ["b"], ["c"]], styles=["green", "yellow"])
    assert lines == [paint("a", "bold"), paint("b", "green"), paint("c", "yellow")]
    assert paint("b", "green") == "\x1b[32mb\x1b[0m" and paint("b", None) == "b"


def test_labelled_text_wraps_under_itself():
    lines = labelled(
        [("note:", "one two three four"), ("a longer label:", "x")], width=28, indent=2
    )
    assert lines == [
        "  note:           one two",
        "                  three four",
        "  a longer label: x",
    ]
    assert labelled([], width=10) == []


def test_wrap_only_when_a_width_is_given():
    assert wrap("one two three", None) == ["one two three"]
    assert wrap("one two three", 8) == ["one two", "three"]
    assert wrap("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # a word longer than the line is cut
