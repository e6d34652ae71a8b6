"""The configuration's exceptions.

``ConfigError`` and ``MissingKeyFileError`` are public; the two private ones are what a value
parser raises, turned into a message with its TOML path by ``relayd.config.converter``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(Exception):
    """Every problem found in one configuration, one message per problem."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "; ".join(self.errors)


class MissingKeyFileError(Exception):
    """A feed's key file does not exist (yet). The feed cannot start until it does; unlike
    other start failures this one does not stop relayd at start-up (see ``key_file_warnings``)."""


class _InvalidValueError(ValueError):
    """A value of the right type that breaks a rule; the message is shown as it is."""


class _WrongTypeError(TypeError):
    """A value of the wrong TOML type. The message keeps cattrs' wording; the value given is
    shown after the TOML path (see ``relayd.config.converter._messages``)."""

    def __init__(self, expected: str, given: Any) -> None:
        super().__init__(f"invalid value for type, expected {expected}")
        self.given = given
