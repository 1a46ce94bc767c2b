"""proxy/sse.py: one test per rule of the SSE specification (WHATWG HTML 9.2.6)."""

from __future__ import annotations

import pytest

from proxy.sse import Event, EventTooLarge, Parser


def parse(*chunks: bytes, limit: int = 1 << 20) -> list[Event]:
    parser = Parser(limit)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    if (last := parser.close()) is not None:
        events.append(last)
    return events


def datas(*chunks: bytes) -> list[bytes | None]:
    return [e.data for e in parse(*chunks)]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_lf_crlf_and_cr_each_end_lines(eol: bytes) -> None:
    stream = b"data: one" + eol + eol + b"data: two" + eol + eol
    assert datas(stream) == [b"one", b"two"]
    # the same stream split at every byte gives the same events, CRLF split included
    assert datas(*(stream[i:i + 1] for i in range(len(stream)))) == [b"one", b"two"]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # A CR ending one chunk and the LF starting the next must not read as a blank line.
    assert datas(b"data: a\r", b"\ndata: b\r\n\r\n") == [b"a\nb"]


def test_multi_line_data_joins_with_lf() -> None:
    assert datas(b"data: first\ndata: second\ndata:\n\n") == [b"first\nsecond\n"]


def test_comments_are_ignored_but_relayed_as_received() -> None:
    events = parse(b": keep-alive\n\ndata: x\n: inside\n\n")
    assert [e.data for e in events] == [None, b"x"]
    assert events[0].raw == b": keep-alive\n\n"
    assert events[1].raw == b"data: x\n: inside\n\n"


def test_one_space_after_the_colon_is_dropped_and_no_more() -> None:
    assert datas(b"data:no-space\n\ndata:  two-spaces\n\n") == [b"no-space", b" two-spaces"]


def test_field_without_colon_has_empty_value() -> None:
    assert datas(b"data\n\n") == [b""]


def test_event_name_and_unknown_fields() -> None:
    (event,) = parse(b"event: ping\nid: 7\nretry: 10\nfoo: bar\ndata: d\n\n")
    assert (event.name, event.data) == (b"ping", b"d")


def test_event_without_data_has_no_data() -> None:
    (event,) = parse(b"id: 1\n\n")
    assert event.data is None and event.raw == b"id: 1\n\n"


def test_final_event_without_blank_line_is_delivered_at_a_clean_end() -> None:
    assert datas(b"data: a\n\ndata: [DONE]\n") == [b"a", b"[DONE]"]
    events = parse(b"data: a\n\ndata: [DONE]")
    assert [e.data for e in events] == [b"a", b"[DONE]"]
    assert events[1].raw == b"data: [DONE]\n\n"  # completed so a client parses it too


def test_leading_bom_is_skipped_even_split() -> None:
    assert datas(b"\xef\xbb\xbfdata: x\n\n") == [b"x"]
    assert datas(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [b"x"]


def test_raw_bytes_are_kept_exactly() -> None:
    stream = b"data: {\"a\": 1}\r\n\r\ndata: b\rdata: c\r\r"
    assert b"".join(e.raw for e in parse(stream)) == stream


def test_text_that_looks_like_done_inside_data_is_data() -> None:
    events = parse(b'data: {"content": "data: [DONE]\\n\\n"}\n\n')
    assert events[0].data == b'{"content": "data: [DONE]\\n\\n"}'


def test_event_over_the_limit_is_refused_before_it_completes() -> None:
    parser = Parser(1024)
    parser.feed(b"data: " + b"x" * 1000)
    with pytest.raises(EventTooLarge):
        parser.feed(b"x" * 100)


def test_many_events_in_one_chunk_and_one_event_over_many_chunks() -> None:
    assert datas(b"data: 1\n\ndata: 2\n\ndata: 3\n\n") == [b"1", b"2", b"3"]
    assert datas(b"da", b"ta: lo", b"ng\n", b"\n") == [b"long"]
