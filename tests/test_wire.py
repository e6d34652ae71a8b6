"""The wire codec: documented vectors, round trips, arbitrary splits, garbage, state machines."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd import wire
from relayd.wire import (
    Ack,
    CaptureConnection,
    Challenge,
    Datagram,
    Decoder,
    EmitConnection,
    Error,
    ErrorCode,
    Event,
    HandshakeError,
    Heartbeat,
    Hello,
    ProtocolError,
    State,
    encode_event,
)

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
SESSION = bytes(range(16))
NONCE = bytes(range(100, 116))
FUZZ_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "2000"))
VECTOR_NAMESPACE = {
    "Datagram": Datagram,
    "Heartbeat": Heartbeat,
    "Ack": Ack,
    "Error": Error,
    "Challenge": Challenge,
    "Hello": Hello,
    "bytes": bytes,
    "range": range,
}


def documented_vectors() -> list[tuple[str, str]]:
    rows = re.findall(
        r"^\| `([A-Z][a-z]+\(.*\))` \| `([0-9a-f]+)` \|$", PROTOCOL_MD.read_text(), re.M
    )
    assert len(rows) >= 7, "PROTOCOL.md lost its test vectors"
    return rows


@pytest.mark.parametrize(("source", "frame_hex"), documented_vectors())
def test_documented_vector(source: str, frame_hex: str) -> None:
    event = eval(source, {"__builtins__": {}}, VECTOR_NAMESPACE)
    assert encode_event(event).hex() == frame_hex
    assert Decoder().feed(bytes.fromhex(frame_hex)) == [event]


def test_documented_authenticated_hello() -> None:
    text = PROTOCOL_MD.read_text()
    mac_hex = re.search(r"\| mac \(hex\) \| `([0-9a-f]+)` \|", text)
    frame_hex = re.search(r"\| frame \(hex\) \| `([0-9a-f]+)` \|", text)
    assert mac_hex
    assert frame_hex
    key = b"secret-key-0123456789abcdef01234"
    mac = wire.hello_mac(key, bytes(range(16)), "prod", bytes(range(16, 32)))
    assert mac.hex() == mac_hex[1]
    assert wire.encode_hello("prod", bytes(range(16, 32)), mac).hex() == frame_hex[1]


# -- strategies ---------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
feed_names = st.from_regex(wire.FEED_NAME_PATTERN, fullmatch=True)
datagrams = st.builds(
    Datagram,
    seq=u64,
    group=st.integers(0xE0000000, 0xEFFFFFFF),
    port=st.integers(0, 65535),
    ts_ns=u64,
    payload=st.binary(max_size=2048),
)
events: st.SearchStrategy[Event] = st.one_of(
    datagrams,
    st.builds(Heartbeat, ts_ns=u64),
    st.builds(Ack, seq=u64),
    st.builds(Error, code=st.integers(0, 65535), message=st.text(max_size=200)),
    st.builds(
        Challenge,
        version=st.just(1),
        auth_required=st.booleans(),
        nonce=st.binary(min_size=16, max_size=16),
    ),
    st.builds(
        Hello,
        version=st.just(1),
        feed=feed_names,
        session_id=st.binary(min_size=16, max_size=16),
        mac=st.sampled_from([b"", bytes(32)]),
    ),
)


@given(st.lists(events, max_size=20), st.data())
@settings(max_examples=FUZZ_EXAMPLES // 4, suppress_health_check=[HealthCheck.too_slow])
def test_any_split_gives_the_same_events(sequence: list[Event], data: st.DataObject) -> None:
    stream = b"".join(encode_event(e) for e in sequence)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = Decoder()
    decoded: list[Event] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        decoded += decoder.feed(stream[start:cut])
        start = cut
        assert decoder.buffered < 2 + 65535
    assert decoded == sequence
    assert decoder.buffered == 0


def test_byte_at_a_time() -> None:
    payloads = [b"", b"x", bytes(range(256)) * 4, bytes(wire.MAX_PAYLOAD)]
    stream = b"".join(
        wire.encode_datagram(i + 1, 0xEF000001, 5000, i, p) for i, p in enumerate(payloads)
    )
    decoder = Decoder()
    out: list[Event] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert [e.payload for e in out if isinstance(e, Datagram)] == payloads


@given(st.binary(max_size=4096))
@settings(max_examples=FUZZ_EXAMPLES)
def test_garbage_only_raises_protocol_error(junk: bytes) -> None:
    decoder = Decoder()
    try:
        decoder.feed(junk)
    except ProtocolError:
        return
    assert decoder.buffered <= 2 + 65535


@given(
    st.lists(events, min_size=1, max_size=5),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=8),
)
@settings(max_examples=FUZZ_EXAMPLES // 4)
def test_corrupted_stream_only_raises_protocol_error(
    sequence: list[Event], at: int, noise: bytes
) -> None:
    stream = bytearray(b"".join(encode_event(e) for e in sequence))
    at %= len(stream)
    stream[at : at + len(noise)] = noise
    with contextlib.suppress(ProtocolError):
        Decoder().feed(bytes(stream))


@pytest.mark.parametrize(
    ("junk", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "unknown frame type 0x54"),
        (b"\x00\x05\x01abcd", "DATA frame of 5 bytes is shorter than its header"),
        (b"\xff\xfc\x01", "DATA frame of 65532 bytes is longer than the largest UDP payload"),
        (b"\x00\x0a\x02", "HEARTBEAT frame of 10 bytes outside 9..9"),
        (b"\x05\x00\x04", "ERROR frame of 1280 bytes outside 3..1027"),
        (b"\x00\x00\x00", "unknown frame type 0x00"),
    ],
)
def test_garbage_is_refused_from_its_first_bytes(junk: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        Decoder().feed(junk)


@pytest.mark.parametrize(
    ("junk", "message"),
    [
        (b"\x16\x03\x01\x02\x00\x01", "DATA frame not allowed here"),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2\r\n", "unknown frame type 0x48"),
        (b"\x00\x09\x02", "HEARTBEAT frame not allowed here"),
    ],
)
def test_strangers_are_refused_before_hello(junk: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        EmitConnection("prod", (), NONCE).receive(junk)


def test_oversize_data_is_refused_before_buffering() -> None:
    # A DATA frame cannot declare more than MAX_PAYLOAD; the largest u16 length is one past it
    # by a few bytes, and the decoder must refuse it without waiting for the body.
    frame = wire.encode_datagram(1, 0xEF000001, 1, 0, bytes(wire.MAX_PAYLOAD))
    assert Decoder().feed(frame)[0].payload == bytes(wire.MAX_PAYLOAD)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_datagram(1, 0xEF000001, 1, 0, bytes(wire.MAX_PAYLOAD + 1))


def test_bad_magic_and_flags() -> None:
    challenge = bytearray(wire.encode_challenge(bytes(16), auth_required=False))
    challenge[3:7] = b"XXXX"
    with pytest.raises(ProtocolError, match="bad magic"):
        Decoder().feed(bytes(challenge))
    data = bytearray(wire.encode_datagram(1, 1, 1, 1, b""))
    data[3] = 0x80
    with pytest.raises(ProtocolError, match="unknown flags"):
        Decoder().feed(bytes(data))


def test_direction_is_enforced() -> None:
    with pytest.raises(ProtocolError, match="ACK frame not allowed here"):
        Decoder(wire.FROM_CAPTURE).feed(wire.encode_ack(1))
    with pytest.raises(ProtocolError, match="DATA frame not allowed here"):
        Decoder(wire.FROM_EMIT).feed(wire.encode_datagram(1, 1, 1, 1, b""))


# -- state machines ---------------------------------------------------------------------------


def state_of(connection: CaptureConnection) -> State:
    return connection.state


def handshake(emit: EmitConnection, capture: CaptureConnection) -> list[Event]:
    (challenge,) = capture.receive(emit.challenge())
    assert isinstance(challenge, Challenge)
    return emit.receive(capture.hello(challenge))


def test_handshake_and_stream() -> None:
    emit = EmitConnection("prod", (), NONCE)
    capture = CaptureConnection("prod", SESSION)
    (hello,) = handshake(emit, capture)
    assert isinstance(hello, Hello)
    assert hello.session_id == SESSION
    assert emit.state is State.STREAMING
    assert capture.state is State.AWAIT_WELCOME
    assert capture.receive(wire.encode_ack(0)) == [Ack(0)]
    assert state_of(capture) is State.STREAMING
    frame = wire.encode_datagram(1, 0xEF000001, 6100, 5, b"abc")
    assert emit.receive(frame + wire.encode_heartbeat(9)) == [
        Datagram(1, 0xEF000001, 6100, 5, b"abc"),
        Heartbeat(9),
    ]


def test_data_before_hello_is_refused() -> None:
    emit = EmitConnection("prod", (), NONCE)
    with pytest.raises(ProtocolError, match="DATA frame not allowed here"):
        emit.receive(wire.encode_datagram(1, 1, 1, 1, b""))


def test_second_hello_is_refused() -> None:
    emit = EmitConnection("prod", (), NONCE)
    capture = CaptureConnection("prod", SESSION)
    handshake(emit, capture)
    with pytest.raises(ProtocolError, match="HELLO frame not allowed here"):
        emit.receive(wire.encode_hello("prod", SESSION))


def test_wrong_feed_is_rejected_with_its_code() -> None:
    emit = EmitConnection("prod", (), NONCE)
    with pytest.raises(HandshakeError, match="serves feed 'prod', not 'dev'") as info:
        handshake(emit, CaptureConnection("dev", SESSION))
    assert info.value.code is ErrorCode.WRONG_FEED


def test_authentication() -> None:
    old, new = b"o" * 32, b"n" * 32
    # Rotation: the emit side accepts either key during the change.
    for key in (old, new):
        emit = EmitConnection("prod", (old, new), NONCE)
        handshake(emit, CaptureConnection("prod", SESSION, key))
        assert emit.state is State.STREAMING
    emit = EmitConnection("prod", (new,), NONCE)
    with pytest.raises(HandshakeError, match="authentication failed") as info:
        handshake(emit, CaptureConnection("prod", SESSION, old))
    assert info.value.code is ErrorCode.AUTH_FAILED
    with pytest.raises(ProtocolError, match="requires authentication"):
        CaptureConnection("prod", SESSION).receive(
            EmitConnection("prod", (new,), NONCE).challenge()
        )


def test_recorded_hello_cannot_be_replayed() -> None:
    key = b"k" * 32
    first = EmitConnection("prod", (key,), NONCE)
    capture = CaptureConnection("prod", SESSION, key)
    (challenge,) = capture.receive(first.challenge())
    assert isinstance(challenge, Challenge)
    recorded = capture.hello(challenge)
    first.receive(recorded)
    second = EmitConnection("prod", (key,), os.urandom(16))
    with pytest.raises(HandshakeError, match="authentication failed"):
        second.receive(recorded)


def test_capture_refuses_ack_before_challenge() -> None:
    with pytest.raises(ProtocolError, match="before CHALLENGE"):
        CaptureConnection("prod", SESSION).receive(wire.encode_ack(3))


def test_pack_header_in_place_matches_encoder() -> None:
    payload = b"market data"
    buffer = bytearray(wire.DATA_HEADER_SIZE + len(payload))
    buffer[wire.DATA_HEADER_SIZE :] = payload
    wire.pack_datagram_header(buffer, 0, 7, 0xEF6F6F01, 6100, 123, len(payload))
    assert bytes(buffer) == wire.encode_datagram(7, 0xEF6F6F01, 6100, 123, payload)
