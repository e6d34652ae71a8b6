"""The TOML configuration (transitional: the whole package still lives in ``parsers``)."""

from relayd.config.parsers import (
    CONTENT_WINDOW_RANGE as CONTENT_WINDOW_RANGE,
)
from relayd.config.parsers import (
    DEFAULT_CONFIG_PATH,
    MAX_BUSY_POLL,
    MAX_CONFIG_BYTES,
    MAX_DURATION,
    MAX_KEY_FILE_BYTES,
    MAX_NESTING,
    MAX_REPLAY_BYTES,
    MAX_SITES,
    MIN_DURATION,
    CaptureFeed,
    CaptureSite,
    Config,
    ConfigError,
    EmitFeed,
    Endpoint,
    GroupPort,
    HealthConfig,
    LogFormat,
    LogLevel,
    MissingKeyFileError,
    PortRange,
    ProcessConfig,
    UnsafeFileError,
    UpstreamCheck,
    key_file_warnings,
    load_config,
    parse_config,
    read_regular_file,
)
from relayd.config.parsers import (
    LINK_LOCAL_MULTICAST as LINK_LOCAL_MULTICAST,
)
from relayd.config.parsers import (
    MAX_EMITTER_CLAIM as MAX_EMITTER_CLAIM,
)
from relayd.config.parsers import (
    MAX_HOLD_TIMEOUT as MAX_HOLD_TIMEOUT,
)
from relayd.config.parsers import (
    MIN_KEY_BYTES as MIN_KEY_BYTES,
)
from relayd.config.parsers import (
    MULTICAST as MULTICAST,
)
from relayd.config.parsers import (  # public, outside __all__, imported by name elsewhere
    Arbitration as Arbitration,
)
from relayd.config.parsers import (
    DeribitLayoutName as DeribitLayoutName,
)

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
