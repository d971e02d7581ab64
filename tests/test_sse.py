"""SSE decoder: every WHATWG parsing rule, fed whole and byte by byte, plus a property test that
any split of the byte stream decodes to the same events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._sse import Comment, ServerSentEvent, SSEDecoder

Item = ServerSentEvent | Comment


def whole(raw: bytes) -> list[Item]:
    dec = SSEDecoder()
    return dec.feed(raw) + dec.close()


def bytewise(raw: bytes) -> list[Item]:
    dec = SSEDecoder()
    out: list[Item] = []
    for i in range(len(raw)):
        out += dec.feed(raw[i : i + 1])
    return out + dec.close()


def decode(raw: bytes) -> list[Item]:
    """Decode whole and byte by byte; both must agree."""
    a, b = whole(raw), bytewise(raw)
    assert a == b
    return a


def ev(data: str, event: str = "message", id: str | None = None, retry: int | None = None) -> Item:
    return ServerSentEvent(data, event, id, retry)


# --- line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(eol: bytes) -> None:
    raw = b"data: a" + eol + eol + b"data: b" + eol + b"data: c" + eol + eol
    assert decode(raw) == [ev("a"), ev("b\nc")]


def test_mixed_line_endings() -> None:
    raw = b"data: a\r\n\ndata: b\r\rdata: c\n\r\n"
    assert decode(raw) == [ev("a"), ev("b"), ev("c")]


def test_crlf_split_across_feeds_is_one_line_ending() -> None:
    dec = SSEDecoder()
    # if the LF were taken for a second line ending, the blank line would dispatch "a" alone
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\ndata: b\r") == []
    assert dec.feed(b"\n\r") == [ev("a\nb")]
    assert dec.feed(b"\n") == []  # completes the CRLF of the blank line: no second dispatch
    assert not dec.has_partial


def test_cr_then_empty_feed_then_lf() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"") == []  # an empty read must not forget the pending CR
    assert dec.feed(b"\n") == []
    assert dec.feed(b"\n") == [ev("a")]


def test_lone_cr_followed_by_other_bytes_in_next_feed() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\r") == [ev("a")]  # CR CR: the second CR is a blank line


# --- fields --------------------------------------------------------------------------------


def test_data_without_space_and_one_space_stripped_only() -> None:
    assert decode(b"data:a\n\n") == [ev("a")]
    assert decode(b"data:  two spaces\n\n") == [ev(" two spaces")]
    assert decode(b"data:\tx\n\n") == [ev("\tx")]


def test_multiline_data_joined_with_newline() -> None:
    assert decode(b'data: {\ndata:   "a": 1\ndata: }\n\n') == [ev('{\n  "a": 1\n}')]


def test_empty_data_lines_count() -> None:
    # "data:" appends an empty line to the buffer, so the event is dispatched with data ""
    assert decode(b"data:\n\n") == [ev("")]
    assert decode(b"data\n\n") == [ev("")]  # no colon: field name "data", empty value
    assert decode(b"data:\ndata:\n\n") == [ev("\n")]


def test_event_type_and_reset_after_dispatch() -> None:
    raw = b"event: error\ndata: x\n\ndata: y\n\n"
    assert decode(raw) == [ev("x", "error"), ev("y")]


def test_empty_event_field_means_message() -> None:
    assert decode(b"event:\ndata: x\n\n") == [ev("x")]


def test_event_without_data_is_not_dispatched_and_resets_type() -> None:
    raw = b"event: ping\n\ndata: x\n\n"
    assert decode(raw) == [ev("x")]


def test_id_persists_across_events_and_can_be_reset() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"
    assert decode(raw) == [ev("a", id="1"), ev("b", id="1"), ev("c", id="")]


def test_id_set_in_undispatched_block_still_counts() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"id: 7\n\ndata: a\n\n") == [ev("a", id="7")]
    assert dec.last_event_id == "7"


def test_id_with_nul_is_ignored() -> None:
    assert decode(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n") == [
        ev("a", id="1"),
        ev("b", id="1"),
    ]


@pytest.mark.parametrize(
    ("line", "retry"),
    [
        (b"retry: 3000", 3000),
        (b"retry:0", 0),
        (b"retry: 30a0", None),
        (b"retry: -1", None),
        (b"retry: 1.5", None),
        (b"retry:", None),
        (b"retry:  10", None),  # only one space is stripped; " 10" is not all digits
        ("retry: \u0663".encode(), None),  # Arabic-Indic digit: a digit, but not ASCII
        ("retry: \u00b2".encode(), None),  # superscript two: str.isdigit() says yes
    ],
)
def test_retry_only_ascii_digits(line: bytes, retry: int | None) -> None:
    dec = SSEDecoder()
    assert dec.feed(line + b"\ndata: x\n\n") == [ev("x", retry=retry)]
    assert dec.retry == retry


def test_retry_is_per_event_but_remembered_by_decoder() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"retry: 5\ndata: a\n\ndata: b\n\n") == [ev("a", retry=5), ev("b")]
    assert dec.retry == 5


def test_unknown_fields_ignored() -> None:
    assert decode(b"foo: bar\ndata: x\nDATA: y\nData: z\n\n") == [ev("x")]


def test_colon_in_value_kept() -> None:
    assert decode(b'data: {"a":"b:c"}\n\n') == [ev('{"a":"b:c"}')]


def test_field_names_are_case_sensitive_and_need_exact_name() -> None:
    assert decode(b"data : x\n\n") == []  # field name is "data " (with a space): unknown


# --- comments -------------------------------------------------------------------------------


def test_comments_are_surfaced_in_order() -> None:
    raw = b": keep-alive\n:ping\ndata: a\n: inside\n\n:\n"
    assert decode(raw) == [
        Comment("keep-alive"),
        Comment("ping"),
        Comment("inside"),
        ev("a"),
        Comment(""),
    ]


def test_comment_does_not_end_an_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n: ka\n") == [Comment("ka")]
    assert dec.has_partial  # the event still waits for its blank line
    assert dec.feed(b"\n") == [ev("a")]


def test_comment_only_stream_has_no_partial() -> None:
    dec = SSEDecoder()
    assert dec.feed(b": ping\n\n: ping\n") == [Comment("ping"), Comment("ping")]
    assert not dec.has_partial


# --- UTF-8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["你好世界", "😀👍🏽 ok", "é ß ∑ 𝄞"])
def test_utf8_split_across_feeds(text: str) -> None:
    raw = f"data: {text}\n\n".encode()
    assert decode(raw) == [ev(text)]
    # and every two-way split, so each multi-byte sequence is cut at every position
    for cut in range(len(raw) + 1):
        dec = SSEDecoder()
        assert dec.feed(raw[:cut]) + dec.feed(raw[cut:]) == [ev(text)]


def test_utf8_split_across_feeds_in_json_chunk() -> None:
    raw = '{"choices":[{"delta":{"content":"流式输出"}}]}'.encode()
    frame = b"data: " + raw + b"\n\n"
    # cut inside the 3-byte encoding of the first Chinese character
    cut = frame.index("流".encode()) + 1
    dec = SSEDecoder()
    assert dec.feed(frame[:cut]) == []
    assert dec.feed(frame[cut:]) == [ev(raw.decode())]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode(b"data: a\xffb\n\n") == [ev("a\ufffdb")]
    # a truncated sequence right before the line ending
    assert decode(b"data: a\xe4\xb8\n\n") == [ev("a\ufffd")]


# --- BOM ------------------------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert decode(b"\xef\xbb\xbfdata: a\n\n") == [ev("a")]


def test_only_one_leading_bom_is_stripped() -> None:
    # the second BOM makes the field name "\ufeffdata", an unknown field
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n") == []


def test_bom_later_in_stream_is_content() -> None:
    assert decode(b"data: \xef\xbb\xbfa\n\n") == [ev("\ufeffa")]


def test_partial_bom_prefix_that_is_not_a_bom() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"\xef") == []
    assert dec.has_partial
    assert dec.feed(b"\xbbX\n") == []  # not a BOM after all: a garbled (unknown) field line
    assert dec.has_partial  # ... of an event that has not seen its blank line yet
    assert dec.feed(b"\ndata: a\n\n") == [ev("a")]
    assert not dec.has_partial


# --- end of stream and has_partial ----------------------------------------------------------


def test_close_discards_unterminated_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: b\n") == [ev("a")]
    assert dec.close() == []
    assert dec.has_partial


def test_has_partial_for_unfinished_line() -> None:
    dec = SSEDecoder()
    assert not dec.has_partial
    dec.feed(b'data: {"cho')
    assert dec.has_partial
    assert dec.close() == []
    assert dec.has_partial


def test_has_partial_false_after_complete_frames() -> None:
    dec = SSEDecoder()
    dec.feed(b"data: a\n\ndata: [DONE]\n\n")
    assert not dec.has_partial
    assert dec.close() == []


def test_has_partial_for_field_without_data() -> None:
    dec = SSEDecoder()
    dec.feed(b"event: error\n")
    assert dec.has_partial
    dec.feed(b"\n")
    assert not dec.has_partial


def test_empty_stream() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"") == []
    assert dec.close() == []
    assert not dec.has_partial


def test_openai_style_stream() -> None:
    frames = [
        b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}',
        b"[DONE]",
    ]
    raw = b"".join(b"data: " + f + b"\n\n" for f in frames)
    assert decode(raw) == [ev(f.decode()) for f in frames]


def test_many_frames_in_one_feed_with_partial_tail() -> None:
    dec = SSEDecoder()
    out = dec.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4")
    assert out == [ev("1"), ev("2"), ev("3")]
    assert dec.feed(b"\n\n") == [ev("4")]


def test_long_line_fed_in_many_pieces() -> None:
    payload = "x" * 100_000
    dec = SSEDecoder()
    raw = f"data: {payload}\n\n".encode()
    out: list[Item] = []
    for i in range(0, len(raw), 7):
        out += dec.feed(raw[i : i + 7])
    assert out == [ev(payload)]


def test_events_are_frozen_value_objects() -> None:
    e = ServerSentEvent("a")
    assert e == ServerSentEvent("a", "message", None, None)
    assert hash(e) == hash(ServerSentEvent("a"))
    with pytest.raises(AttributeError):
        e.data = "b"  # type: ignore[misc]
    assert e != Comment("a")


# --- property: any split of the stream decodes the same ---------------------------------------

_line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
_block = st.fixed_dictionaries(
    {
        "data": st.lists(_line_text, max_size=3),
        "event": st.one_of(st.none(), _line_text),
        "id": st.one_of(st.none(), _line_text),
        "retry": st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
        "comment": st.one_of(st.none(), _line_text),
    }
)
_eol = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[Item]]:
    """An encoded stream (random line ending per line, optional BOM) and its expected items."""
    blocks = draw(st.lists(_block, max_size=6))
    parts: list[str] = []
    expected: list[Item] = []
    last_id: str | None = None

    def line(text: str) -> None:
        eol = draw(_eol)
        if not text and parts and parts[-1].endswith("\r") and eol == "\n":
            eol = "\r"  # CR then an LF-terminated blank line would be one CRLF, not two lines
        parts.append(text + eol)

    for b in blocks:
        if b["comment"] is not None:
            line(": " + b["comment"])
            expected.append(Comment(b["comment"]))
        if b["event"] is not None:
            line("event: " + b["event"])
        if b["id"] is not None:
            line("id: " + b["id"])
            if "\0" not in b["id"]:
                last_id = b["id"]
        if b["retry"] is not None:
            line(f"retry: {b['retry']}")
        for d in b["data"]:
            line("data: " + d)
        line("")
        if b["data"]:
            expected.append(
                ServerSentEvent("\n".join(b["data"]), b["event"] or "message", last_id, b["retry"])
            )
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + "".join(parts).encode(), expected


@settings(max_examples=300, derandomize=True, deadline=None)
@given(stream=_streams(), data=st.data())
def test_any_split_yields_same_events(
    stream: tuple[bytes, list[Item]], data: st.DataObject
) -> None:
    raw, expected = stream
    assert whole(raw) == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    dec = SSEDecoder()
    out: list[Item] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        out += dec.feed(raw[prev:cut])
        prev = cut
    assert out + dec.close() == expected
    assert not dec.has_partial


@settings(max_examples=60, derandomize=True, deadline=None)
@given(stream=_streams())
def test_byte_by_byte_matches_expected(stream: tuple[bytes, list[Item]]) -> None:
    raw, expected = stream
    assert bytewise(raw) == expected
