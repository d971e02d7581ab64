import pytest

from keel._splice import CONTINUE_INSTRUCTION, OverlapTrimmer, continuation_body

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.mark.parametrize(
    ("dialect", "flag"),
    [
        ("dashscope", {"partial": True}),
        ("moonshot", {"partial": True}),
        ("deepseek", {"prefix": True}),
        ("anthropic", {}),
    ],
)
def test_prefill_uses_the_providers_own_flag(dialect, flag) -> None:
    out = continuation_body(BODY, "你好 wor", "prefill", dialect, tokens_sent=3)
    assert out is not None
    assert out["messages"][-1] == {"role": "assistant", "content": "你好 wor", **flag}
    assert out["max_tokens"] == 7
    assert BODY["messages"] == [{"role": "user", "content": "hi"}]  # input untouched


def test_vllm_prefill_continues_the_final_message() -> None:
    out = continuation_body(BODY, "abc", "prefill", "vllm", tokens_sent=1)
    assert out is not None
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False


def test_instruct_appends_the_instruction() -> None:
    out = continuation_body(BODY, "abc", "instruct", "openai", tokens_sent=1)
    assert out is not None
    assert out["messages"][-2:] == [
        {"role": "assistant", "content": "abc"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


def test_token_limit_reached_means_no_continuation() -> None:
    assert continuation_body(BODY, "x" * 10, "prefill", "openai", tokens_sent=10) is None
    body = {**BODY, "max_tokens": None, "max_completion_tokens": 4}
    assert continuation_body(body, "x", "prefill", "openai", tokens_sent=4) is None


def feed_all(sent: str, pieces: list[str]) -> str:
    t = OverlapTrimmer(sent)
    return "".join(t.feed(p) for p in pieces) + t.flush()


@pytest.mark.parametrize(
    ("sent", "pieces", "expected"),
    [
        ("hello brave new world", [" new", " wor", "ld and more"], " and more"),  # repeat trimmed
        ("hello brave new world", [" and", " more"], " and more"),  # no repeat
        ("hel", ["lo"], "lo"),  # one shared char is not a repeat
        ("你好世界模型", ["世界", "模型网关"], "网关"),  # CJK repeat
        ("上海", ["上海", "很好"], "很好"),  # all of the text so far repeated
        ("the cat", [" the", " dog"], " the dog"),  # occurs inside, but not as a suffix
        ("abc", [], ""),
        ("", ["x"], "x"),
        ("ab ab", ["ab ab ab", " c"], " ab c"),  # the longest overlap wins
    ],
)
def test_overlap_trimmer(sent, pieces, expected) -> None:
    assert feed_all(sent, pieces) == expected


def test_trimmer_passes_through_untouched_once_decided() -> None:
    t = OverlapTrimmer("one two")
    assert t.feed(" three") == " three"
    assert t.feed(" two") == " two"  # later repeats are the model's own words
