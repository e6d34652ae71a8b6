"""The relayd wire protocol, sans-I/O: bytes in, events out, no sockets.

Every frame is ``u16 length | u8 type | body`` in network byte order, where ``length`` counts the
bytes after the length field. docs/PROTOCOL.md has the byte layout, the state machine and test
vectors. The decoder is incremental (any split of the stream gives the same events) and bounded:
it holds at most one incomplete frame, and it checks a frame's type and declared length against
that type's limits as soon as the first three bytes arrive, so garbage is refused at once.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple, TypeAlias

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"RLYD"
MAX_PAYLOAD: Final = 65507  # largest UDP payload over IPv4
MAX_FEED_NAME: Final = 63
SESSION_ID_SIZE: Final = 16
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32  # HMAC-SHA256
MAX_ERROR_TEXT: Final = 1024
FEED_NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class FrameType(enum.IntEnum):
    DATA = 0x01
    HEARTBEAT = 0x02
    ACK = 0x03
    ERROR = 0x04
    CHALLENGE = 0x10
    HELLO = 0x11


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    WRONG_FEED = 2
    TOO_MANY_CONNECTIONS = 3
    AUTH_FAILED = 4
    UNSUPPORTED_VERSION = 5
    SHUTTING_DOWN = 6
    HELLO_TIMEOUT = 7
    IDLE_TIMEOUT = 8
    FEED_REMOVED = 9
    SLOW_CONSUMER = 10
    NOT_ACTIVE = 11


class ProtocolError(Exception):
    """The peer sent bytes that are not this protocol: garbage, bad magic or version, a frame
    that is oversize, undersize, unknown, or not allowed in the connection's state.

    ``events`` holds what the same ``feed`` call decoded before the bad frame: data accepted
    before the peer went wrong is still the peer's data."""

    code: ErrorCode = ErrorCode.PROTOCOL
    events: list[Event] = []  # noqa: RUF012 - replaced per instance by Decoder.feed


class HandshakeError(ProtocolError):
    """A well-formed HELLO that this side refuses (wrong feed, version, key)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- events ---------------------------------------------------------------------------------
# NamedTuples: the decoder builds one per datagram, and a tuple is the cheapest typed record.


class Datagram(NamedTuple):
    seq: int
    group: int  # IPv4 address as an int (cheap to carry, cheap to look up)
    port: int
    ts_ns: int  # capture time, CLOCK_REALTIME nanoseconds
    payload: bytes


class Heartbeat(NamedTuple):
    ts_ns: int


class Ack(NamedTuple):
    seq: int  # highest sequence emitted in this session; 0 for none


class Error(NamedTuple):
    code: int
    message: str


class Challenge(NamedTuple):
    version: int
    auth_required: bool
    nonce: bytes


class Hello(NamedTuple):
    version: int
    feed: str
    session_id: bytes
    mac: bytes


Event: TypeAlias = Datagram | Heartbeat | Ack | Error | Challenge | Hello

# -- layout ---------------------------------------------------------------------------------

_DATA: Final = int(FrameType.DATA)
_DATA_HEADER: Final = struct.Struct("!HBBHIQQ")  # length type flags port group seq ts
DATA_HEADER_SIZE: Final = _DATA_HEADER.size  # 26
_DATA_BODY_MIN: Final = DATA_HEADER_SIZE - 2
_DATA_BODY_MAX: Final = _DATA_BODY_MIN + MAX_PAYLOAD
_U64_FRAME: Final = struct.Struct("!HBQ")
_U64: Final = struct.Struct("!Q")
_ERROR_HEAD: Final = struct.Struct("!HBH")
_CHALLENGE: Final = struct.Struct(f"!HB4sBB{NONCE_SIZE}s")
_HELLO_HEAD: Final = struct.Struct("!HB4sBB")  # length type magic version name_len

# Smallest and largest legal body length (after the length field) per frame type.
_LIMITS: Final[dict[int, tuple[int, int]]] = {
    FrameType.DATA: (_DATA_BODY_MIN, _DATA_BODY_MIN + MAX_PAYLOAD),
    FrameType.HEARTBEAT: (9, 9),
    FrameType.ACK: (9, 9),
    FrameType.ERROR: (3, 3 + MAX_ERROR_TEXT),
    FrameType.CHALLENGE: (_CHALLENGE.size - 2, _CHALLENGE.size - 2),
    FrameType.HELLO: (
        _HELLO_HEAD.size - 2 + 1 + SESSION_ID_SIZE + 1,
        _HELLO_HEAD.size - 2 + MAX_FEED_NAME + SESSION_ID_SIZE + 1 + MAC_SIZE,
    ),
}

#: Frame types each side may receive (the direction is part of the protocol).
FROM_CAPTURE: Final = frozenset(
    {FrameType.HELLO, FrameType.DATA, FrameType.HEARTBEAT, FrameType.ERROR}
)
FROM_EMIT: Final = frozenset(
    {FrameType.CHALLENGE, FrameType.ACK, FrameType.HEARTBEAT, FrameType.ERROR}
)

# -- encoders -------------------------------------------------------------------------------


def encode_datagram(seq: int, group: int, port: int, ts_ns: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return (
        _DATA_HEADER.pack(_DATA_BODY_MIN + len(payload), FrameType.DATA, 0, port, group, seq, ts_ns)
        + payload
    )


def pack_datagram_header(
    buffer: bytearray | memoryview,
    offset: int,
    seq: int,
    group: int,
    port: int,
    ts_ns: int,
    payload_size: int,
) -> None:
    """Write a DATA header in front of a payload already received at ``offset + 26``.

    The capture hot path receives each datagram straight into its frame buffer and frames it in
    place, so a datagram is copied once on its way from the socket to TCP.
    """
    _DATA_HEADER.pack_into(
        buffer, offset, _DATA_BODY_MIN + payload_size, FrameType.DATA, 0, port, group, seq, ts_ns
    )


def encode_heartbeat(ts_ns: int) -> bytes:
    return _U64_FRAME.pack(9, FrameType.HEARTBEAT, ts_ns)


def encode_ack(seq: int) -> bytes:
    return _U64_FRAME.pack(9, FrameType.ACK, seq)


def encode_error(code: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return _ERROR_HEAD.pack(3 + len(text), FrameType.ERROR, code) + text


def encode_challenge(nonce: bytes, *, auth_required: bool) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return _CHALLENGE.pack(
        _CHALLENGE.size - 2,
        FrameType.CHALLENGE,
        MAGIC,
        PROTOCOL_VERSION,
        1 if auth_required else 0,
        nonce,
    )


def encode_hello(feed: str, session_id: bytes, mac: bytes = b"") -> bytes:
    if not FEED_NAME_PATTERN.fullmatch(feed):
        raise ValueError(f"invalid feed name {feed!r}")
    if len(session_id) != SESSION_ID_SIZE:
        raise ValueError(f"session id must be {SESSION_ID_SIZE} bytes")
    if len(mac) not in (0, MAC_SIZE):
        raise ValueError(f"mac must be empty or {MAC_SIZE} bytes")
    name = feed.encode("ascii")
    body = name + session_id + bytes((len(mac),)) + mac
    head = _HELLO_HEAD.pack(
        _HELLO_HEAD.size - 2 + len(body), FrameType.HELLO, MAGIC, PROTOCOL_VERSION, len(name)
    )
    return head + body


def hello_mac(key: bytes, nonce: bytes, feed: str, session_id: bytes) -> bytes:
    """HMAC-SHA256 over the emit side's fresh nonce, so a recorded HELLO cannot be replayed."""
    message = b"relayd-hello-v1\x00" + nonce + feed.encode("ascii") + b"\x00" + session_id
    return hmac.new(key, message, hashlib.sha256).digest()


def encode_event(event: Event) -> bytes:
    """Encode any event; the inverse of the decoder (used by tests and tools)."""
    if isinstance(event, Datagram):
        return encode_datagram(event.seq, event.group, event.port, event.ts_ns, event.payload)
    if isinstance(event, Heartbeat):
        return encode_heartbeat(event.ts_ns)
    if isinstance(event, Ack):
        return encode_ack(event.seq)
    if isinstance(event, Error):
        return encode_error(event.code, event.message)
    if isinstance(event, Challenge):
        return encode_challenge(event.nonce, auth_required=event.auth_required)
    return encode_hello(event.feed, event.session_id, event.mac)


# -- decoder --------------------------------------------------------------------------------


class Decoder:
    """Incremental frame decoder for one direction of one connection."""

    __slots__ = ("_pending", "allowed")

    def __init__(self, allowed: Iterable[int] = FrameType) -> None:
        self._pending = b""
        self.allowed: frozenset[int] = frozenset(allowed)

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete frame (never more than one maximal frame)."""
        return len(self._pending)

    def take_buffered(self) -> bytes:
        """Hand over the bytes of an incomplete frame: another decoder goes on from there."""
        data, self._pending = self._pending, b""
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode every complete frame of ``data`` (after what was buffered before).

        Raises ProtocolError on the first bad frame; the decoder is then unusable, as the
        stream has lost its framing.
        """
        buf = self._pending + bytes(data) if self._pending else bytes(data)
        events: list[Event] = []
        try:
            self._decode(buf, events)
        except ProtocolError as exc:
            exc.events = events
            raise
        return events

    def _decode(self, buf: bytes, events: list[Event]) -> None:
        """Append every complete frame of ``buf`` to ``events``; keep the rest pending."""
        append = events.append
        allowed = self.allowed
        data_allowed = _DATA in allowed
        unpack_data = _DATA_HEADER.unpack_from
        new = tuple.__new__  # skips NamedTuple's argument parsing: ~100 ns a datagram
        size = len(buf)
        off = 0
        while size - off >= 3:
            length = (buf[off] << 8) | buf[off + 1]
            ftype = buf[off + 2]
            end = off + 2 + length
            if ftype == _DATA and data_allowed:
                if length < _DATA_BODY_MIN:
                    raise ProtocolError(f"DATA frame of {length} bytes is shorter than its header")
                if length > _DATA_BODY_MAX:
                    raise ProtocolError(
                        f"DATA frame of {length} bytes is longer than the largest UDP payload"
                    )
                if end > size:
                    break
                _, _, flags, port, group, seq, ts = unpack_data(buf, off)
                if flags:
                    raise ProtocolError(f"DATA frame with unknown flags {flags:#04x}")
                append(new(Datagram, (seq, group, port, ts, buf[off + DATA_HEADER_SIZE : end])))
            else:
                _check_header(ftype, length, allowed)
                if end > size:
                    break
                append(_decode_control(ftype, buf, off, end))
            off = end
        self._pending = buf[off:]


def _check_header(ftype: int, length: int, allowed: frozenset[int]) -> None:
    limits = _LIMITS.get(ftype)
    if limits is None:
        raise ProtocolError(f"unknown frame type {ftype:#04x}")
    if ftype not in allowed:
        raise ProtocolError(f"{FrameType(ftype).name} frame not allowed here")
    low, high = limits
    if not low <= length <= high:
        raise ProtocolError(
            f"{FrameType(ftype).name} frame of {length} bytes outside {low}..{high}"
        )


def _decode_control(ftype: int, buf: bytes, off: int, end: int) -> Event:
    body = off + 3
    if ftype == FrameType.HEARTBEAT:
        return Heartbeat(_U64.unpack_from(buf, body)[0])
    if ftype == FrameType.ACK:
        return Ack(_U64.unpack_from(buf, body)[0])
    if ftype == FrameType.ERROR:
        code = (buf[body] << 8) | buf[body + 1]
        return Error(code, buf[body + 2 : end].decode("utf-8", "replace"))
    if ftype == FrameType.CHALLENGE:
        _, _, magic, version, flags, nonce = _CHALLENGE.unpack_from(buf, off)
        _check_magic(magic)
        if flags & ~1:
            raise ProtocolError(f"CHALLENGE with unknown flags {flags:#04x}")
        return Challenge(version, bool(flags & 1), nonce)
    # HELLO
    _, _, magic, version, name_len = _HELLO_HEAD.unpack_from(buf, off)
    _check_magic(magic)
    pos = off + _HELLO_HEAD.size
    if not 1 <= name_len <= MAX_FEED_NAME:
        raise ProtocolError(f"HELLO feed name of {name_len} bytes")
    name = buf[pos : pos + name_len]
    pos += name_len
    session_id = buf[pos : pos + SESSION_ID_SIZE]
    pos += SESSION_ID_SIZE
    if pos >= end:
        raise ProtocolError("HELLO truncated before its MAC length")
    mac_len = buf[pos]
    mac = buf[pos + 1 : end]
    if mac_len not in (0, MAC_SIZE) or len(mac) != mac_len:
        raise ProtocolError(f"HELLO MAC length {mac_len} does not match the frame")
    try:
        feed = name.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("HELLO feed name is not ASCII") from None
    if not FEED_NAME_PATTERN.fullmatch(feed):
        raise ProtocolError(f"HELLO feed name {feed!r} is not a valid name")
    return Hello(version, feed, session_id, mac)


def _check_magic(magic: bytes) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")


# -- connection state machines ---------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"  # emit side, after sending CHALLENGE
    AWAIT_CHALLENGE = "await-challenge"  # capture side, after connecting
    AWAIT_WELCOME = "await-welcome"  # capture side, after sending HELLO
    STREAMING = "streaming"


class EmitConnection:
    """The emit side of one TCP connection.

    Sends CHALLENGE on accept, requires HELLO first (right feed, version, key), then accepts
    DATA, HEARTBEAT and ERROR. The caller sends the welcome ACK once the HELLO is accepted.
    """

    def __init__(self, feed: str, keys: Sequence[bytes], nonce: bytes) -> None:
        self.feed = feed
        self.keys = tuple(keys)
        self.nonce = nonce
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self._decoder = Decoder({FrameType.HELLO, FrameType.ERROR})

    def challenge(self) -> bytes:
        return encode_challenge(self.nonce, auth_required=bool(self.keys))

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events = self._decoder.feed(data)
        if self.state is State.AWAIT_HELLO and events:
            # Only HELLO and ERROR decode in this state; the capture side waits for the
            # welcome ACK before it streams, so nothing but an ERROR may follow the HELLO.
            if isinstance(events[0], Hello):
                self._accept(events[0])
            for later in events[1:]:
                if not isinstance(later, Error):
                    raise ProtocolError(f"{type(later).__name__.upper()} frame before the welcome")
        return events

    def take_buffered(self) -> bytes:
        """The bytes received after the last complete frame, taken out of the decoder (the
        emit feed's C data path goes on decoding from them)."""
        return self._decoder.take_buffered()

    def _accept(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise HandshakeError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {hello.version} not supported (want {PROTOCOL_VERSION})",
            )
        if hello.feed != self.feed:
            raise HandshakeError(
                ErrorCode.WRONG_FEED, f"this listener serves feed {self.feed!r}, not {hello.feed!r}"
            )
        if self.keys:
            if not hello.mac:
                raise HandshakeError(ErrorCode.AUTH_FAILED, "authentication required")
            if not any(
                hmac.compare_digest(
                    hello.mac, hello_mac(k, self.nonce, hello.feed, hello.session_id)
                )
                for k in self.keys
            ):
                raise HandshakeError(ErrorCode.AUTH_FAILED, "authentication failed")
        self.hello = hello
        self.state = State.STREAMING
        self._decoder.allowed = frozenset({FrameType.DATA, FrameType.HEARTBEAT, FrameType.ERROR})


class CaptureConnection:
    """The capture side of one TCP connection: wait for CHALLENGE, send HELLO, wait for the
    welcome ACK, then stream."""

    def __init__(self, feed: str, session_id: bytes, key: bytes | None = None) -> None:
        self.feed = feed
        self.session_id = session_id
        self.key = key
        self.state = State.AWAIT_CHALLENGE
        self._decoder = Decoder(FROM_EMIT)

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events = self._decoder.feed(data)
        for event in events:
            if isinstance(event, Challenge):
                if self.state is not State.AWAIT_CHALLENGE:
                    raise ProtocolError("CHALLENGE frame not allowed here")
                if event.version != PROTOCOL_VERSION:
                    raise ProtocolError(f"emit side speaks protocol version {event.version}")
                if event.auth_required and self.key is None:
                    raise ProtocolError("emit side requires authentication and no key is set")
            elif isinstance(event, Ack) and self.state is State.AWAIT_WELCOME:
                self.state = State.STREAMING
            elif isinstance(event, (Ack, Heartbeat)) and self.state is State.AWAIT_CHALLENGE:
                raise ProtocolError(f"{type(event).__name__} frame before CHALLENGE")
        return events

    def take_buffered(self) -> bytes:
        """The bytes received after the last complete frame, taken out of the decoder (the
        capture feed's C reader goes on decoding from them)."""
        return self._decoder.take_buffered()

    def hello(self, challenge: Challenge) -> bytes:
        """The HELLO answering ``challenge``; call once, after receiving it."""
        mac = b""
        if self.key is not None:
            mac = hello_mac(self.key, challenge.nonce, self.feed, self.session_id)
        self.state = State.AWAIT_WELCOME
        return encode_hello(self.feed, self.session_id, mac)
