"""The cattrs converter: each TOML table structured into its model class, and the messages.

Unknown keys are refused, each field goes through its value parser (``relayd.config.parsers``)
and each table through its rules (``relayd.config.checks``); every failure becomes a message
in the form of cattrs' ``transform_error``, naming its TOML path.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, get_args

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn, override

from relayd.config.checks import _check_capture, _check_emit
from relayd.config.errors import _InvalidValueError, _WrongTypeError
from relayd.config.model import (
    Arbitration,
    CaptureFeed,
    CaptureSite,
    DeribitLayoutName,
    EmitFeed,
    HealthConfig,
    LogFormat,
    LogLevel,
    ProcessConfig,
    UpstreamCheck,
)
from relayd.config.parsers import (
    _MAX_SOCKET_BUFFER,
    _MIN_REPLAY_BYTES,
    MAX_REPLAY_BYTES,
    Parser,
    T,
    _bool,
    _busy_poll,
    _cidr,
    _content_window,
    _duration,
    _emitter_claim,
    _endpoint,
    _feed_name,
    _group_cidr,
    _group_port,
    _hold_timeout,
    _int,
    _int_in,
    _interface,
    _ipv4_only,
    _listen_endpoint,
    _name,
    _one_of,
    _path,
    _port_range,
    _size,
    _source,
    _str,
    _tuple_of,
)
from relayd.wire import MAX_PAYLOAD

# --------------------------------------------------------------------------------------------
# The converter: cattrs structures each table, the parsers structure each value.

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict_hook(parser: Parser[T]) -> Callable[[Any, Any], T]:
    return lambda value, _type: parser(value)


for _type, _parser in ((int, _int), (str, _str), (bool, _bool)):
    _converter.register_structure_hook(_type, _strict_hook(_parser))


def _register(
    cls: type[T],
    parsers: Mapping[str, Parser[Any]],
    check: Callable[[T], Iterator[tuple[str, str]]] | None = None,
) -> None:
    """Structure ``cls`` from a TOML table: unknown keys refused, each field by its parser, then
    ``check`` for rules across fields (it yields ``(field, message)`` pairs)."""
    missing = {a.name for a in attrs.fields(cls) if a.init} - set(parsers)  # type: ignore[arg-type]
    assert not missing, f"no parser for {cls.__name__}.{missing}"
    overrides = {name: override(struct_hook=_strict_hook(p)) for name, p in parsers.items()}
    generated = make_dict_structure_fn(cls, _converter, **overrides)  # type: ignore[arg-type]

    def structure(value: Any, _type: Any) -> T:
        if not isinstance(value, dict):
            raise _WrongTypeError("table", value)
        instance: T = generated(value, cls)
        if check is not None:
            errors: list[Exception] = []
            for field, message in check(instance):
                exc = _InvalidValueError(message)
                setattr(exc, "__notes__", [AttributeValidationNote(field, field, object)])  # noqa: B010
                errors.append(exc)
            if errors:
                raise ClassValidationError(f"invalid {cls.__name__}", errors, cls)
        return instance

    _converter.register_structure_hook(cls, structure)


_register(
    ProcessConfig,
    {"log_level": _one_of(get_args(LogLevel)), "log_format": _one_of(get_args(LogFormat))},
)
_register(HealthConfig, {"listen": _listen_endpoint})
_register(
    EmitFeed,
    {
        "name": _feed_name,
        "listen": _ipv4_only(_listen_endpoint),
        "interface": _interface,
        "allowed_sources": _tuple_of(_cidr, non_empty=True),
        "allowed_groups": _tuple_of(_group_cidr, non_empty=True),
        "ttl": _int_in(1, 255),
        "loop": _bool,
        "allowed_ports": _tuple_of(_port_range, non_empty=True),
        "max_connections": _int_in(1),
        "hello_timeout": _duration,
        "heartbeat_interval": _duration,
        "idle_timeout": _duration,
        "send_buffer": _size(hi=_MAX_SOCKET_BUFFER),
        "max_datagram_size": _int_in(1, MAX_PAYLOAD),
        "auth_key_files": _tuple_of(_path),
        "arbitration": _one_of(get_args(Arbitration)),
        "deribit_layout": _one_of(get_args(DeribitLayoutName)),
        "arbitration_hold_timeout": _hold_timeout,
        "arbitration_content_window": _content_window,
        "busy_poll": _busy_poll,
        "watch_groups": _tuple_of(_group_port, unique=True),
        "emitter_grace": _duration,
        "emitter_claim": _emitter_claim,
        "beacon_port": _int_in(0, 65535),
    },
    _check_emit,
)


_site_name = _name("site")


_register(
    CaptureSite,
    {
        "name": _site_name,
        "targets": _tuple_of(_ipv4_only(_endpoint), non_empty=True, unique=True),
        "replay_max_bytes": _size(lo=_MIN_REPLAY_BYTES, hi=MAX_REPLAY_BYTES),
        "replay_max_age": _duration,
        "auth_key_file": _path,
    },
)


def _site_table(value: Any) -> CaptureSite:
    return _converter.structure(value, CaptureSite)


_register(
    CaptureFeed,
    {
        "name": _feed_name,
        "interface": _interface,
        "groups": _tuple_of(_group_port, non_empty=True, unique=True),
        "targets": _tuple_of(_ipv4_only(_endpoint), non_empty=True, unique=True),
        "receive_buffer": _size(hi=_MAX_SOCKET_BUFFER),
        "replay_max_bytes": _size(lo=_MIN_REPLAY_BYTES, hi=MAX_REPLAY_BYTES),
        "replay_max_age": _duration,
        "heartbeat_interval": _duration,
        "idle_timeout": _duration,
        "connect_timeout": _duration,
        "reconnect_budget": _duration,
        "ack_timeout": _duration,
        "auth_key_file": _path,
        "sources": _tuple_of(_source, unique=True),
        "upstream_check": _one_of(get_args(UpstreamCheck)),
        "deribit_layout": _one_of(get_args(DeribitLayoutName)),
        "site": _tuple_of(_site_table),
        "busy_poll": _busy_poll,
    },
    _check_capture,
)


# --------------------------------------------------------------------------------------------
# Messages


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _WrongTypeError):
        return f"{exc}{_GOT}(got {_shown(exc.given)})"
    if isinstance(exc, _InvalidValueError):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl) if a.init]
        return "; ".join(_unknown_key(key, known) for key in sorted(exc.extra_fields))
    if isinstance(exc, KeyError):
        return "required key missing"
    return cattrs.v.format_exception(exc, type_)


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _messages(exc: Exception, path: str) -> list[str]:
    """``message @ path``, and ``message @ path (got value)`` for a value of the wrong type:
    the prefix stays what cattrs' ``transform_error`` says."""
    messages = []
    for message in cattrs.transform_error(exc, path, _describe):
        text, got, rest = message.partition(_GOT)
        shown, at, where = rest.rpartition(" @ ")
        if not got:
            messages.append(message)
        else:
            messages.append(f"{text} @ {where} {shown}" if at else f"{text} {rest}")
    return messages


# Separates a message from the "(got ...)" that _messages moves behind the TOML path. JSON
# escapes it inside any value shown, so it can only come from here.
_GOT: Final = "\x1f"
_MAX_SHOWN: Final = 40


def _shown(value: Any) -> str:
    """A value as the TOML file wrote it, cut short: ``"abc"``, ``16``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        text = json.dumps(value[:_MAX_SHOWN], ensure_ascii=False)
        return text[:-1] + '..."' if len(value) > _MAX_SHOWN else text
    if isinstance(value, (int, float)):
        return json.dumps(value)[:_MAX_SHOWN]
    return str(value)[:_MAX_SHOWN]  # a TOML date or time, written without quotes
