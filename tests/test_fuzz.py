"""Fuzzing of the two parsers that read untrusted input: the wire decoder and the config loader.

Random bytes rarely get past a decoder's first check, so most cases here start from *valid*
input and mutate it the way a broken peer, a bit flip or a careless edit would: a length field
one off or at its limits, a type byte swapped, a frame cut short or spliced from the other
direction, a flag set; for the configuration, lines of the real example files deleted,
duplicated, renamed by one character, given another key's value, or cut mid-line. Whatever the
input, only the typed errors may come out (``ProtocolError`` from the wire, ``ConfigError``
from the configuration), and some invariants must hold on the way (the decoder buffers at most
one frame; decoded events encode back to the bytes they came from; every config message names
a TOML path).

The budget is ``RELAYD_FUZZ_EXAMPLES`` examples per test (default 2000; ``make fuzz`` sets
200000). tests/test_wire.py and tests/test_config.py hold the simpler property tests (any
split of a valid stream, random garbage, plausible tables); these go further.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relayd.config import ConfigError, load_config, parse_config
from relayd.wire import (
    FROM_CAPTURE,
    FROM_EMIT,
    Ack,
    CaptureConnection,
    Challenge,
    Datagram,
    Decoder,
    EmitConnection,
    Error,
    Event,
    FrameType,
    Heartbeat,
    Hello,
    ProtocolError,
    State,
    encode_event,
    hello_mac,
)

FUZZ_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "2000"))
MAX_FRAME = 2 + 65535
EXAMPLES = Path(__file__).resolve().parent.parent / "etc" / "relayd"
KEY = b"fuzz-key-0123456789abcdef-0123456"
NONCE = bytes(range(16))
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONFIG_SETTINGS = settings(
    max_examples=max(50, FUZZ_EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- valid frames --------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
feed_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
datagrams = st.builds(
    Datagram,
    seq=u64,
    group=st.integers(0, 2**32 - 1),
    port=st.integers(0, 65535),
    ts_ns=u64,
    payload=st.binary(max_size=300),
)
common = st.one_of(
    st.builds(Heartbeat, ts_ns=u64),
    st.builds(Error, code=st.integers(0, 65535), message=st.text(max_size=40)),
)
from_capture: st.SearchStrategy[Event] = st.one_of(datagrams, common)
from_emit: st.SearchStrategy[Event] = st.one_of(st.builds(Ack, seq=u64), common)
sessions = st.binary(min_size=16, max_size=16)


def hello_frame(feed: str, session: bytes, key: bytes | None) -> bytes:
    mac = hello_mac(key, NONCE, feed, session) if key is not None else b""
    return encode_event(Hello(1, feed, session, mac))


def challenge_frame(auth: bool) -> bytes:
    return encode_event(Challenge(1, auth, NONCE))


# -- structured mutations ----------------------------------------------------------------------

_TYPES = [int(t) for t in FrameType] + [0, 5, 0x0F, 0x12, 0xFF]
_LENGTHS = [0, 1, 2, 3, 8, 9, 10, 22, 23, 24, 25, 65531, 65532, 65535]


def frame_offsets(stream: bytes) -> list[int]:
    """Where each frame of a valid stream starts."""
    offsets, off = [], 0
    while off + 2 <= len(stream):
        offsets.append(off)
        off += 2 + struct.unpack_from("!H", stream, off)[0]
    return offsets


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    """``stream`` with 1 to 4 mutations, aimed mostly at frame headers."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        offsets = frame_offsets(bytes(data)) or [0]
        at = draw(st.sampled_from(offsets))
        kind = draw(
            st.sampled_from(
                ["length", "length_delta", "type", "flags", "bit", "byte", "cut", "insert",
                 "duplicate", "drop", "magic", "name_len", "mac_len"]
            )
        )  # fmt: skip
        if not data and kind not in ("insert",):
            kind = "insert"
        if kind == "length" and at + 2 <= len(data):
            struct.pack_into("!H", data, at, draw(st.sampled_from(_LENGTHS)))
        elif kind == "length_delta" and at + 2 <= len(data):
            old = struct.unpack_from("!H", data, at)[0]
            struct.pack_into("!H", data, at, (old + draw(st.integers(-3, 3))) & 0xFFFF)
        elif kind == "type" and at + 3 <= len(data):
            data[at + 2] = draw(st.sampled_from(_TYPES))
        elif kind == "flags" and at + 4 <= len(data):
            data[at + 3] = draw(st.integers(1, 255))  # DATA flags / ERROR code / magic byte
        elif kind == "bit":
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "duplicate":
            end = offsets[offsets.index(at) + 1] if at != offsets[-1] else len(data)
            data[at:at] = data[at:end]
        elif kind == "drop" and len(offsets) > 1:
            end = offsets[offsets.index(at) + 1] if at != offsets[-1] else len(data)
            del data[at:end]
        elif kind == "magic" and at + 7 <= len(data):
            data[at + 3 : at + 7] = draw(st.sampled_from([b"RLYd", b"\0\0\0\0", b"GET "]))
        elif kind == "name_len" and at + 8 <= len(data):
            data[at + 7] = draw(st.sampled_from([0, 1, 63, 64, 200, 255]))
        elif kind == "mac_len" and len(data) > at + 3:
            pos = draw(st.integers(at + 3, len(data) - 1))
            data[pos] = draw(st.sampled_from([0, 1, 31, 32, 33, 255]))
    return bytes(data)


def split_feed(decoder: Decoder | EmitConnection | CaptureConnection, data: bytes,
               cuts: list[int]) -> list[Event]:  # fmt: skip
    """Feed ``data`` in pieces; checks the decoder's bound after every piece."""
    events: list[Event] = []
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        events += decoder.receive(data[start:cut]) if not isinstance(decoder, Decoder) else (
            decoder.feed(data[start:cut]))  # fmt: skip
        start = max(start, cut)
        inner = decoder if isinstance(decoder, Decoder) else decoder._decoder
        assert inner.buffered <= MAX_FRAME
    return events


# -- wire: mutated streams ---------------------------------------------------------------------


@SETTINGS
@given(st.lists(from_capture, min_size=1, max_size=12), st.data())
def test_mutated_capture_stream_only_raises_protocol_error(
    sequence: list[Event], data: st.DataObject
) -> None:
    stream = b"".join(encode_event(e) for e in sequence)
    bad = data.draw(mutated(stream))
    cuts = data.draw(st.lists(st.integers(0, 2**16), max_size=4))
    decoder = Decoder(FROM_CAPTURE)
    try:
        events = split_feed(decoder, bad, cuts)
    except ProtocolError:
        return
    # Accepted bytes are frames: every decoded event encodes back to the bytes it came from
    # (ERROR text is decoded with replacement, so it may differ).
    if not any(isinstance(e, Error) for e in events):
        consumed = len(bad) - decoder.buffered
        assert b"".join(encode_event(e) for e in events) == bad[:consumed]


@SETTINGS
@given(st.lists(from_emit, max_size=8), st.booleans(), st.data())
def test_mutated_emit_stream_to_capture_side(
    sequence: list[Event], auth: bool, data: st.DataObject
) -> None:
    """The capture side reads CHALLENGE, the welcome ACK, then ACKs and HEARTBEATs."""
    stream = challenge_frame(auth) + b"".join(encode_event(e) for e in sequence)
    bad = data.draw(st.one_of(st.just(stream), mutated(stream)))
    conn = CaptureConnection("prod", bytes(16), KEY if data.draw(st.booleans()) else None)
    try:
        for event in split_feed(conn, bad, data.draw(st.lists(st.integers(0, 2**16)))):
            if isinstance(event, Challenge) and conn.state is State.AWAIT_CHALLENGE:
                conn.hello(event)
    except ProtocolError:
        return
    assert conn.state in (State.AWAIT_CHALLENGE, State.AWAIT_WELCOME, State.STREAMING)


@SETTINGS
@given(
    feed=st.sampled_from(["prod", "dev", "prod2"]),
    key=st.sampled_from([KEY, b"w" * 32, None]),
    after=st.lists(from_capture, max_size=6),
    data=st.data(),
)
def test_mutated_handshake_only_raises_protocol_error(
    feed: str, key: bytes | None, after: list[Event], data: st.DataObject
) -> None:
    """The emit side's gate: HELLO (right or wrong feed and key, mutated) then a stream."""
    stream = hello_frame(feed, data.draw(sessions), key) + b"".join(encode_event(e) for e in after)
    bad = data.draw(st.one_of(st.just(stream), mutated(stream)))
    conn = EmitConnection("prod", (KEY,), NONCE)
    try:
        split_feed(conn, bad, data.draw(st.lists(st.integers(0, 2**16), max_size=4)))
    except ProtocolError:
        assert conn.state is not State.STREAMING or conn.hello is not None
        return
    if conn.state is State.STREAMING:
        # Nothing but the right feed with the right key gets through the gate.
        assert conn.hello is not None
        assert conn.hello.feed == "prod"
        assert conn.hello.mac == hello_mac(KEY, NONCE, "prod", conn.hello.session_id)


@SETTINGS
@given(st.data())
def test_forged_macs_never_pass(data: st.DataObject) -> None:
    """A HELLO whose mac is anything but the one for this nonce is refused (no key leaks out
    of a near miss: one bit off, another nonce, another session, another feed)."""
    session = data.draw(sessions)
    good = hello_mac(KEY, NONCE, "prod", session)
    forged = data.draw(
        st.one_of(
            st.binary(min_size=32, max_size=32),
            st.integers(0, 255).map(lambda bit: _flip(good, bit)),
            sessions.map(lambda other: hello_mac(KEY, other, "prod", session)),
            sessions.map(lambda other: hello_mac(KEY, NONCE, "prod", other)),
            st.just(hello_mac(KEY, NONCE, "dev", session)),
        )
    )
    assume(forged != good)
    conn = EmitConnection("prod", (b"old-key-0123456789abcdef", KEY), NONCE)
    with pytest.raises(ProtocolError) as info:
        conn.receive(encode_event(Hello(1, "prod", session, forged)))
    assert int(info.value.code) == 4
    assert conn.state is State.AWAIT_HELLO


def _flip(mac: bytes, bit: int) -> bytes:
    out = bytearray(mac)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@SETTINGS
@given(st.sampled_from(_TYPES), st.integers(0, 65535), st.sampled_from([FROM_CAPTURE, FROM_EMIT]))
def test_every_header_is_judged_from_three_bytes(
    ftype: int, length: int, allowed: frozenset[int]
) -> None:
    """A header that can never become a legal frame is refused before its body arrives; one
    that can is buffered (at most one frame)."""
    decoder = Decoder(allowed)
    try:
        assert decoder.feed(struct.pack("!HB", length, ftype)) == []
    except ProtocolError:
        return
    assert ftype in allowed
    assert decoder.buffered == 3


# -- configuration: mutated example files --------------------------------------------------------

_EXAMPLE_TEXTS = [p.read_text() for p in sorted(EXAMPLES.glob("*.toml"))]
_PATH = re.compile(r" @ \$")
_VALUE_POOL = [
    '"2s"', '"0s"', '"-1s"', "0", "-1", "65536", "1e400", "nan", "true", '"ens5"', '"lo"',
    '"0.0.0.0:0"', '"0.0.0.0:99999"', '"239.1.1.1:6100"', '"224.0.0.1:6100"', '"10.0.0.0/8"',
    '"10.0.0.1/8"', '"6101-6100"', '["239.1.1.0/24"]', "[]", '[""]', '["a\\u0000b"]', "{}",
    '"\\ud7ff"', '"keys/dev.key"', '"../../etc/shadow"', '"/"', '"1GiB"', '"1TiB"', '"4MiB"',
]  # fmt: skip


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(_EXAMPLE_TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 6))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        kind = draw(
            st.sampled_from(
                ["delete", "duplicate", "value", "rename", "header", "cut", "swap", "junk",
                 "block"]
            )
        )  # fmt: skip
        key, eq, _ = line.partition(" = ")
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "value" and eq:
            lines[i] = f"{key} = {draw(st.sampled_from(_VALUE_POOL))}"
        elif kind == "rename" and eq and key:
            pos = draw(st.integers(0, len(key) - 1))
            lines[i] = key[:pos] + draw(st.sampled_from("abz_-1.")) + key[pos + 1 :] + eq + _
        elif kind == "header":
            lines.insert(i, draw(st.sampled_from(["[emit]", "[[health]]", "[capture", "[[x]]"])))
        elif kind == "cut":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=20)))
        elif kind == "block":
            start = max(k for k in range(i + 1) if not lines[k].startswith("[") or k == 0)
            lines[i:i] = lines[start : i + 1]
    return "\n".join(lines) + "\n"


def _check_messages(errors: tuple[str, ...]) -> None:
    assert errors, "a ConfigError without a message"
    for message in errors:
        assert "\n" not in message
        assert message.startswith("invalid TOML") or _PATH.search(message), message


@CONFIG_SETTINGS
@given(mutated_config())
def test_mutated_examples_give_config_or_named_errors(text: str) -> None:
    outcomes: list[object] = []
    for _ in range(2):  # deterministic: the same text gives the same answer
        try:
            outcomes.append(parse_config(text))
        except ConfigError as exc:
            _check_messages(exc.errors)
            outcomes.append(exc.errors)
    assert outcomes[0] == outcomes[1]


_KEY_CONTENTS = st.one_of(
    st.none(),  # missing
    st.just("dir"),
    st.just("dangling"),
    st.binary(max_size=40),
    st.sampled_from([b"\n" * 64, b" " * 20 + b"k" * 15, b"k" * 16, b"\0" * 16, b"\xff" * 4096]),
)


@CONFIG_SETTINGS
@given(mutated_config(), st.lists(_KEY_CONTENTS, min_size=1, max_size=3), st.booleans())
def test_load_config_with_any_key_files(
    text: str, keys: list[bytes | str | None], relative: bool
) -> None:
    """load_config with key files missing, dangling, directories, short, binary: only
    ConfigError comes out, and every problem it names has its TOML path."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        paths = []
        for n, content in enumerate(keys):
            path = base / f"k{n}.key"
            if content == "dir":
                path.mkdir()
            elif content == "dangling":
                path.symlink_to(base / "nowhere")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            paths.append(path.name if relative else str(path))
        files = ", ".join(f'"{p}"' for p in paths)
        text = re.sub(r"(?m)^#? ?auth_key_files = .*$", f"auth_key_files = [{files}]", text)
        text = re.sub(r"(?m)^#? ?auth_key_file = .*$", f'auth_key_file = "{paths[0]}"', text)
        config_file = base / "relayd.toml"
        config_file.write_text(text)
        try:
            config = load_config(config_file)
        except ConfigError as exc:
            _check_messages(exc.errors)
            return
        for feed in config.emit:
            assert all(p.is_absolute() for p in feed.auth_key_files)
