"""FastStream's Redis envelope as `streams.resp` writes it: the bytes FastStream writes, read back by FastStream."""

from __future__ import annotations

import asyncio

from faststream.redis.parser.binary import BinaryMessageFormatV1
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.resp import faststream_entry, parse_faststream_entry

ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60)
any_text = st.text(max_size=60)
header_names = st.sampled_from(["content-type", "event-type", "message-id", "message_id", "x-custom"])


@given(
    body=st.binary(max_size=300),
    correlation_id=ascii_text,
    headers=st.dictionaries(header_names, ascii_text, max_size=4),
)
def test_ascii_envelopes_are_the_bytes_faststream_encodes(
    body: bytes, correlation_id: str, headers: dict[str, str]
) -> None:
    theirs = asyncio.run(
        BinaryMessageFormatV1.encode(message=body, reply_to=None, headers=headers, correlation_id=correlation_id)
    )
    _, their_headers = BinaryMessageFormatV1.parse(theirs)
    ours = faststream_entry(body, list(their_headers.items()))  # the same headers, in FastStream's order
    assert ours == theirs


@given(body=st.binary(max_size=300), headers=st.dictionaries(header_names, any_text, max_size=4))
def test_any_text_headers_are_read_back_by_faststream(body: bytes, headers: dict[str, str]) -> None:
    """Lengths in bytes: a non-ASCII header value (a producer's message id) survives the round trip."""
    assert BinaryMessageFormatV1.parse(faststream_entry(body, list(headers.items()))) == (body, headers)


def _envelope(body: bytes, headers: dict[str, str]) -> bytes:
    return faststream_entry(body, list(headers.items()))


@given(
    data=st.one_of(
        st.binary(max_size=200),  # anything a producer may have written
        st.builds(_envelope, st.binary(max_size=100), st.dictionaries(header_names, any_text, max_size=4)),
        st.builds(  # an envelope cut short or with bytes flipped
            lambda raw, cut, at, byte: raw[:cut] if cut else raw[:at] + bytes([byte]) + raw[at + 1 :],
            st.builds(_envelope, st.binary(max_size=50), st.dictionaries(header_names, any_text, max_size=3)),
            st.integers(0, 120),
            st.integers(0, 120),
            st.integers(0, 255),
        ),
        st.just(b'{"data": "legacy", "headers": {"a": "b"}}'),
    )
)
@settings(max_examples=1000)
def test_entries_are_parsed_as_faststream_parses_them(data: bytes) -> None:
    assert parse_faststream_entry(data) == BinaryMessageFormatV1.parse(data)
