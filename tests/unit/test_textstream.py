"""Unit tests for inferd.runtimes.textstream.TextStream: incremental UTF-8 and stop strings.

Pure logic: tokens are fed as the byte strings a byte-level tokenizer would produce.
"""

from __future__ import annotations

import pytest

from inferd.runtimes.textstream import TextStream


def feed(stream: TextStream, data: bytes, size: int = 1) -> list[str]:
    """Push ``data`` in ``size``-byte tokens; the chunk each push returned."""
    return [stream.push(data[i:i + size]) for i in range(0, len(data), size)]


# --- plain text ---------------------------------------------------------------------------------

def test_plain_text_is_released_as_pushed():
    stream = TextStream()
    assert stream.push(b"Hel") == "Hel"
    assert stream.push(b"lo") == "lo"
    assert stream.push(b", world") == ", world"
    assert stream.finish() == ""
    assert not stream.stopped


def test_every_byte_of_ascii_comes_back_at_once_without_stops():
    text = "The quick brown fox jumps over the lazy dog.\n"
    stream = TextStream()
    assert feed(stream, text.encode()) == list(text)


def test_empty_push_releases_nothing():
    stream = TextStream()
    assert stream.push(b"") == ""
    assert stream.push(b"ab") == "ab"
    assert stream.push(b"") == ""


# --- UTF-8 across tokens ------------------------------------------------------------------------

@pytest.mark.parametrize("char", ["é", "€", "✓", "😀", "中"])
def test_multibyte_character_split_across_tokens_comes_out_whole(char):
    data = char.encode("utf-8")
    assert len(data) >= 2
    stream = TextStream()
    chunks = feed(stream, data)
    assert chunks[:-1] == [""] * (len(data) - 1)   # nothing while the character is incomplete
    assert chunks[-1] == char
    assert stream.finish() == ""


def test_mixed_text_split_byte_by_byte_round_trips():
    text = "naïve café: 1€, ✓ 😀 中文 done"
    stream = TextStream()
    chunks = feed(stream, text.encode("utf-8"))
    assert "".join(chunks) + stream.finish() == text
    # Never a partial character: every chunk is valid text on its own and no replacement appears.
    assert all("\ufffd" not in c for c in chunks)
    assert [c for c in chunks if c] == list(text)


def test_character_completed_by_the_next_token_comes_with_it():
    stream = TextStream()
    assert stream.push(b"a\xc3") == "a"      # "a" and the first byte of "é"
    assert stream.push(b"\xa9b") == "éb"


@pytest.mark.parametrize("data", [b"\xff", b"\xfe", b"\xc0\xaf", b"\x80"])
def test_invalid_bytes_become_replacement_characters(data):
    stream = TextStream()
    out = "".join(feed(stream, data)) + stream.finish()
    assert out and set(out) == {"\ufffd"}


def test_invalid_byte_between_text_is_replaced_in_place():
    stream = TextStream()
    out = "".join(feed(stream, b"ab\xffcd")) + stream.finish()
    assert out == "ab\ufffdcd"


def test_truncated_character_interrupted_by_ascii_is_replaced():
    stream = TextStream()
    out = "".join(feed(stream, b"x\xe2\x82y")) + stream.finish()   # "€" is e2 82 ac
    assert out == "x\ufffdy"


def test_finish_flushes_a_partial_character_as_replacement():
    stream = TextStream()
    assert stream.push(b"ok\xe2\x82") == "ok"
    assert stream.finish() == "\ufffd"


# --- stop strings -------------------------------------------------------------------------------

def test_stop_string_across_token_boundaries():
    stream = TextStream(("STOP",))
    released = feed(stream, b"abcSTOPdef")
    assert "".join(released) == "abc"
    assert stream.stopped
    # The push that completed the stop released nothing of it, and later pushes are silent.
    assert released[6] == ""
    assert all(chunk == "" for chunk in released[7:])
    assert stream.push(b"more text") == ""
    assert stream.finish() == ""


def test_stop_string_never_released_even_partially():
    stream = TextStream(("</s>",))
    released = []
    for token in (b"hello <", b"/", b"s", b">", b" tail"):
        released.append(stream.push(token))
    assert released == ["hello ", "", "", "", ""]
    assert stream.stopped
    assert "<" not in "".join(released)


def test_text_before_stop_released_in_same_push():
    stream = TextStream(("##",))
    assert stream.push(b"abc#") == "abc"     # "#" held back: it may start "##"
    assert stream.push(b"#xyz") == ""        # the stop: nothing of it, nothing after it
    assert stream.stopped


def test_stop_string_inside_one_token():
    stream = TextStream(("end",))
    assert stream.push(b"the end of it") == "the "
    assert stream.stopped


def test_held_back_prefix_released_when_it_is_not_a_stop():
    stream = TextStream(("STOP",))
    assert stream.push(b"ab") == "ab"
    assert stream.push(b"S") == ""           # could start "STOP"
    assert stream.push(b"T") == ""           # "ST" still could
    assert stream.push(b"x") == "STx"        # "STx" cannot: all of it now
    assert not stream.stopped
    assert stream.push(b"y") == "y"


def test_held_back_prefix_released_at_finish():
    stream = TextStream(("STOP",))
    assert stream.push(b"abSTO") == "ab"
    assert stream.finish() == "STO"
    assert not stream.stopped


def test_held_back_text_restarts_a_stop_match():
    # "aab" with stop "ab": the first "a" is released once the second "a" shows it cannot be the start.
    stream = TextStream(("ab",))
    assert stream.push(b"a") == ""
    assert stream.push(b"a") == "a"
    assert stream.push(b"b") == ""
    assert stream.stopped
    assert stream.finish() == ""


def test_several_stop_strings_the_earliest_wins():
    stream = TextStream(("world", "lo"))
    # "lo" (at 3) starts before "world" (at 6), though "world" is listed first.
    out = "".join(feed(stream, b"hello world"))
    assert out == "hel"
    assert stream.stopped


def test_several_stops_earliest_wins_when_found_in_the_same_push():
    stream = TextStream(("cd", "bcde"))
    assert stream.push(b"abcdef") == "a"     # "bcde" starts at 1, "cd" at 2
    assert stream.stopped


def test_several_stops_shorter_completes_first():
    # "xyz" completes before "wxyz0" could: the stream stops at "xyz" and releases "w".
    stream = TextStream(("wxyz0", "xyz"))
    out = "".join(feed(stream, b"awxyz0"))
    assert out == "aw"
    assert stream.stopped


def test_hold_back_uses_the_longest_possible_prefix_of_any_stop():
    stream = TextStream(("ab", "xabc"))
    assert stream.push(b"1xa") == "1"        # "xa" could start "xabc"
    assert stream.push(b"b") == "x"          # "ab" is a stop: "x" before it is released
    assert stream.stopped


def test_stop_string_with_multibyte_characters_split_across_tokens():
    stream = TextStream(("éé",))
    data = "caféé!".encode("utf-8")
    out = "".join(feed(stream, data))
    assert out == "caf"
    assert stream.stopped


def test_stop_found_after_a_long_run_of_released_text():
    stream = TextStream(("<|end|>",))
    body = "x" * 500
    out = "".join(feed(stream, (body + "<|en").encode(), size=3))
    assert out == body
    assert stream.push(b"d|>") == ""
    assert stream.stopped


def test_no_stop_text_round_trips_when_stops_configured():
    text = "a <b> c </ d"
    stream = TextStream(("</s>", "<eos>"))
    out = "".join(feed(stream, text.encode())) + stream.finish()
    assert out == text
    assert not stream.stopped
