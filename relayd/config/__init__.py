"""The TOML configuration: a frozen attrs model, its loader and its validation.

``load_config(path)`` is the one entry point that ``relayd check-config``, start-up and
``SIGHUP`` reload all use, so all three accept and refuse exactly the same files. Every problem
in a file is collected and raised together as one :class:`ConfigError`, each message naming
the TOML path it is about, in the form cattrs' ``transform_error`` uses::

    invalid value for type, expected int @ $.emit[0].ttl (got "abc")

The key reference is ``docs/CONFIG.md``; the model mirrors it field for field. The package is
split by job, and every public name is imported from here (``from relayd.config import X``):

- ``model``: the frozen attrs classes, one per TOML table;
- ``values``: the value types (``Endpoint``, ``GroupPort``, ``PortRange``);
- ``parsers``: one TOML value in, a typed value out, and the bounds they enforce;
- ``converter``: cattrs structuring of each table, and the error messages;
- ``checks``: the rules across fields and across tables (pure);
- ``files``: bounded, non-blocking reads of the configuration and key files;
- ``load``: ``parse_config``, ``load_config`` and the key-file checks;
- ``errors``: the exceptions.
"""

from relayd.config.errors import ConfigError, MissingKeyFileError
from relayd.config.files import MAX_KEY_FILE_BYTES, UnsafeFileError, read_regular_file
from relayd.config.files import MIN_KEY_BYTES as MIN_KEY_BYTES
from relayd.config.load import (
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_BYTES,
    MAX_NESTING,
    key_file_warnings,
    load_config,
    parse_config,
)
from relayd.config.model import (
    MAX_SITES,
    CaptureFeed,
    CaptureSite,
    Config,
    EmitFeed,
    HealthConfig,
    LogFormat,
    LogLevel,
    ProcessConfig,
    UpstreamCheck,
)
from relayd.config.model import Arbitration as Arbitration
from relayd.config.model import DeribitLayoutName as DeribitLayoutName
from relayd.config.parsers import CONTENT_WINDOW_RANGE as CONTENT_WINDOW_RANGE
from relayd.config.parsers import (
    MAX_BUSY_POLL,
    MAX_DURATION,
    MAX_REPLAY_BYTES,
    MIN_DURATION,
)
from relayd.config.parsers import MAX_EMITTER_CLAIM as MAX_EMITTER_CLAIM
from relayd.config.parsers import MAX_HOLD_TIMEOUT as MAX_HOLD_TIMEOUT
from relayd.config.values import LINK_LOCAL_MULTICAST as LINK_LOCAL_MULTICAST
from relayd.config.values import MULTICAST as MULTICAST
from relayd.config.values import Endpoint, GroupPort, PortRange

# The names imported "as" themselves above are public too, outside __all__ as before the split.
__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_BUSY_POLL",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION",
    "MAX_KEY_FILE_BYTES",
    "MAX_NESTING",
    "MAX_REPLAY_BYTES",
    "MAX_SITES",
    "MIN_DURATION",
    "CaptureFeed",
    "CaptureSite",
    "Config",
    "ConfigError",
    "EmitFeed",
    "Endpoint",
    "GroupPort",
    "HealthConfig",
    "LogFormat",
    "LogLevel",
    "MissingKeyFileError",
    "PortRange",
    "ProcessConfig",
    "UnsafeFileError",
    "UpstreamCheck",
    "key_file_warnings",
    "load_config",
    "parse_config",
    "read_regular_file",
]
