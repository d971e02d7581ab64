# ruff: noqa: RUF001 - full-width CJK punctuation is what is tested
"""Sentence segmentation (keel._segment): table-driven, plus properties that must hold for any
text — the segments concatenate to exactly the input, none is longer than max_chars, and
how the text is split into pieces on the way in does not change where it is cut."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel._segment import Segmenter, segments
from keel.sim import answer_text

CASES = [
    # (text, max_chars, min_chars, expected segments)
    ("", 100, 0, []),
    ("当然可以。", 100, 0, ["当然可以。"]),
    ("当然可以。一一得一，一二得二。", 100, 0, ["当然可以。", "一一得一，一二得二。"]),
    (
        "你好！你好吗？我很好；谢谢…再见",
        100,
        0,
        ["你好！", "你好吗？", "我很好；", "谢谢…", "再见"],
    ),
    ("真的吗？！太好了……好。", 100, 0, ["真的吗？！", "太好了……", "好。"]),
    ("他说：“好。”然后走了。", 100, 0, ["他说：“好。”", "然后走了。"]),
    ("Hello world. How are you? Fine!", 100, 0, ["Hello world.", " How are you?", " Fine!"]),
    ("Wait... what?! Ok", 100, 0, ["Wait...", " what?!", " Ok"]),
    ('He said "hi." Then left.', 100, 0, ['He said "hi."', " Then left."]),
    ("Pi is 3.14 and keel.yaml is a file.", 100, 0, ["Pi is 3.14 and keel.yaml is a file."]),
    ("a;b; c", 100, 0, ["a;b;", " c"]),
    ("line one\nline two\n\nthree", 100, 0, ["line one\n", "line two\n\n", "three"]),
    ("Done.你好。", 100, 0, ["Done.", "你好。"]),
    ("no punctuation at all", 100, 0, ["no punctuation at all"]),
    # long runs: the last soft break in the window's last two thirds, else a hard cut
    ("aaaa bbbb cccc dddd", 10, 0, ["aaaa bbbb ", "cccc dddd"]),
    ("一二三四五六七八九十一二三", 5, 0, ["一二三四五", "六七八九十", "一二三"]),
    ("一二三，四五六七八九十", 6, 0, ["一二三，", "四五六七八九", "十"]),
    ("!!!!!!!!", 3, 0, ["!!!", "!!!", "!!"]),
    # min_chars: a short sentence joins the next one
    ("好。我们开始吧。", 100, 3, ["好。我们开始吧。"]),
    ("好。我们开始吧。", 100, 0, ["好。", "我们开始吧。"]),
    ("Ok. Go.", 100, 4, ["Ok. Go."]),
    ("emoji 🚀. next", 100, 0, ["emoji 🚀.", " next"]),
]


@pytest.mark.parametrize(("text", "max_chars", "min_chars", "expected"), CASES)
def test_table(text: str, max_chars: int, min_chars: int, expected: list[str]) -> None:
    assert segments(text, max_chars, min_chars) == expected
    assert "".join(expected) == text


@pytest.mark.parametrize(("text", "max_chars", "min_chars", "expected"), CASES)
def test_table_char_by_char(text: str, max_chars: int, min_chars: int, expected: list[str]) -> None:
    s = Segmenter(max_chars, min_chars)
    out: list[str] = []
    for c in text:
        out += s.feed(c)
    assert out + s.flush() == expected


def test_a_cut_waits_for_the_end_of_the_run() -> None:
    s = Segmenter()
    assert s.feed("真的吗？") == []
    assert s.feed("！好") == ["真的吗？！"]
    assert s.pending == "好"
    assert s.feed("Pi is 3.") == []  # a digit may follow
    assert s.feed("14.") == []  # the run may go on
    assert s.feed(" ") == ["好Pi is 3.14."]  # a space: the sentence has ended
    assert s.flush() == [" "]


def test_simulator_answers_cut_exactly() -> None:
    for i in range(200):
        text = answer_text(f"prompt {i}", 60)
        segs = segments(text, 40)
        assert "".join(segs) == text
        assert all(0 < len(s) <= 40 for s in segs)


def test_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Segmenter(0)
    with pytest.raises(ValueError):
        Segmenter(10, 11)


ALPHABET = st.sampled_from(list('ab 1.!?;，。！？；…”"\n好🚀,:'))


@given(
    st.text(ALPHABET, max_size=300),
    st.integers(1, 30),
    st.integers(0, 30),
    st.lists(st.integers(1, 12), min_size=1, max_size=40),
)
def test_properties(text: str, max_chars: int, min_chars: int, cuts: list[int]) -> None:
    min_chars = min(min_chars, max_chars)
    whole = segments(text, max_chars, min_chars)
    assert "".join(whole) == text
    assert all(0 < len(s) <= max_chars for s in whole)
    s = Segmenter(max_chars, min_chars)
    out: list[str] = []
    pos, k = 0, 0
    while pos < len(text):
        step = cuts[k % len(cuts)]
        out += s.feed(text[pos : pos + step])
        pos, k = pos + step, k + 1
    assert out + s.flush() == whole
