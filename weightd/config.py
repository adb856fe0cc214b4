"""weightd's configuration: one frozen dataclass, three ways to set it.

Every setting has one name everywhere: ``cache_dir`` in the TOML file,
``WEIGHTD_CACHE_DIR`` in the environment, ``--cache-dir`` on the command line. Flags
override the environment, which overrides the file, which overrides the defaults.
Sizes accept units (``"64MiB"``, ``"2GB"``); unknown keys are an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "WEIGHTD_"

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A setting has an unknown name or a value that cannot be parsed."""


def parse_size(value: str | int) -> int:
    """Parse a byte size: ``1048576``, ``"64MiB"``, ``"2GB"``, ``"1.5GiB"``.

    Example
    -------
    >>> parse_size("64MiB")
    67108864
    """
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {value!r} (use bytes or a unit such as 64MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: str | float) -> float:
    """Parse a duration in seconds: ``60``, ``"1.5"``, ``"500ms"``, ``"90s"``, ``"2m"``,
    ``"1h"``.

    Example
    -------
    >>> parse_duration("2m")
    120.0
    """
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"a duration cannot be negative: {value}")
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ConfigError(f"not a duration: {value!r} (use seconds, or a unit: 500ms, 90s, "
                          "2m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def format_size(n: float) -> str:
    """Format a byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def user_cache_home() -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``: where a user's caches live."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache"))


def _default_cache_dir() -> Path:
    return user_cache_home() / "weightd"


def _default_socket() -> Path:
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return Path(run) / "weightd.sock"
    return Path("/tmp") / f"weightd-{os.getuid()}" / "weightd.sock"


def _size(v: Any) -> int:
    return parse_size(v)


def _opt_size(v: Any) -> int | None:
    return None if v in (None, "", "none") else parse_size(v)


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"not an integer: {v!r}") from e


def _opt_int(v: Any) -> int | None:
    return None if v in (None, "", "none") else _int(v)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"not a number: {v!r}") from e


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {v!r} (use true or false)")


def parse_share(v: Any) -> float | None:
    """``"90%"`` → 90.0 (percent); None for a value that is not a share (a size);
    ConfigError for a share that is not a number in (0, 100]."""
    text = str(v).strip()
    if not text.endswith("%"):
        return None
    try:
        share = float(text[:-1].strip())
    except ValueError as e:
        raise ConfigError(f"not a share: {v!r} (use e.g. 90%)") from e
    if not 0 < share <= 100:
        raise ConfigError(f"a share must be more than 0% and at most 100%, got {v!r}")
    return share


def _opt_budget(v: Any) -> str | None:
    if v in (None, ""):
        return None
    text = str(v).strip()
    return text if parse_share(text) is not None else str(parse_size(text))


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9464"``, ``":9464"`` for every interface).

    Raises:
        ConfigError: no port, or a port outside 0..65535.
    """
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{address!r} is not host:port (e.g. 127.0.0.1:9464, [::1]:9464)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def _opt_address(v: Any) -> str | None:
    if v in (None, ""):
        return None
    parse_address(str(v))
    return str(v).strip()


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(v: Any) -> str:
    level = str(v).strip().upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"not a log level: {v!r} (use {', '.join(_LOG_LEVELS)})")
    return level


def _path(v: Any) -> Path:
    return Path(os.path.expanduser(str(v)))


def _opt_str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _opt_path(v: Any) -> Path | None:
    return None if v in (None, "") else _path(v)


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    if isinstance(v, Sequence):
        return tuple(str(s) for s in v)
    raise ConfigError(f"not a list of strings: {v!r}")


def _mirror_urls(v: Any) -> tuple[str, ...]:
    urls = _str_list(v)
    for url in urls:
        bucket = url.split("://", 1)[1].split("/", 1)[0] if url.startswith("s3://") else ""
        if not bucket:
            raise ConfigError(f"{url!r} is not an s3://bucket/prefix URL (a mirror is an "
                              "S3-compatible store; its endpoint is mirror_endpoint_url)")
    if len(urls) > 1:
        raise ConfigError(f"one mirror is supported, got {len(urls)} ({', '.join(urls)}): its "
                          "endpoint and credentials are the mirror_* settings")
    return tuple(u.rstrip("/") for u in urls)


def _proxy_url(v: Any) -> str | None:
    text = _opt_str(v)
    if text is None:
        return None
    m = re.match(r"^http://(?:[^@/]*@)?(\[[0-9a-fA-F:.]+\]|[^:/@\[\]]+)(?::(\d+))?/?$",
                 text.strip())
    if not m or (m.group(2) is not None and int(m.group(2)) > 65535):
        raise ConfigError(f"{text!r} is not a proxy URL http://[user:password@]host[:port] "
                          "(https:// to the proxy itself is not supported)")
    return text.strip()


def _setting(default: Any, parse: Callable[[Any], Any], doc: str, *,
             secret: bool = False) -> Any:
    # a secret (a key, a proxy URL with a password) never shows in the config's repr
    meta = {"parse": parse, "doc": doc}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta, repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


@dataclasses.dataclass(frozen=True)
class Config:
    """All of weightd's settings. Build one with :func:`load_config`."""

    cache_dir: Path = _setting(_default_cache_dir, _path, "where the cache lives, on local disk")
    socket: Path = _setting(_default_socket, _path, "the daemon's unix socket")
    allowed_sources: tuple[str, ...] = _setting(
        tuple, _str_list,
        "source prefixes the daemon may read, comma-separated (default: anything its user can)"
    )
    s3_endpoint_url: str | None = _setting(
        None, _opt_str, "S3 endpoint (default: AWS_ENDPOINT_URL, then AWS)"
    )
    hf_endpoint: str | None = _setting(
        None, _opt_str, "Hugging Face hub endpoint (default: HF_ENDPOINT, then huggingface.co)"
    )
    hf_download_hosts: tuple[str, ...] = _setting(
        ("hf.co", "*.hf.co", "huggingface.co", "*.huggingface.co"), _str_list,
        "hosts (host, *.domain, host:port) the hub may redirect a download to, besides its own"
    )
    http_proxy: str | None = _setting(
        None, _proxy_url,
        "proxy for http(s):// and hf:// sources, http://[user:password@]host:port, e.g. "
        "Dragonfly's dfdaemon; hosts in NO_PROXY go direct (default: HTTP_PROXY / "
        "HTTPS_PROXY / NO_PROXY from the environment, else none)", secret=True
    )
    http_ca_bundle: Path | None = _setting(
        None, _opt_path,
        "PEM file of CA certificates trusted for https:// and hf:// sources besides the "
        "system's (a proxy that re-signs TLS)"
    )
    mirrors: tuple[str, ...] = _setting(
        tuple, _mirror_urls,
        "S3-compatible mirror shared by the cluster's nodes, s3://bucket/prefix (default: none)"
    )
    mirror_endpoint_url: str | None = _setting(
        None, _opt_str,
        "the mirror's S3 endpoint (MinIO, Ceph RGW...); never s3_endpoint_url or "
        "AWS_ENDPOINT_URL (default: AWS S3)"
    )
    mirror_region: str | None = _setting(
        None, _opt_str, "the mirror's region (default: the AWS configuration's)"
    )
    mirror_access_key_id: str | None = _setting(
        None, _opt_str,
        "the mirror's access key id, with mirror_secret_access_key (default: "
        "mirror_profile, else the AWS default chain)"
    )
    mirror_secret_access_key: str | None = _setting(
        None, _opt_str, "the mirror's secret key (prefer the environment to a flag)",
        secret=True
    )
    mirror_profile: str | None = _setting(
        None, _opt_str, "a profile of ~/.aws/config for the mirror's credentials"
    )
    mirror_timeout: float = _setting(
        10.0, parse_duration,
        "connect and read timeout of each mirror request: a slower mirror is skipped for "
        "the origin"
    )
    mirror_wait: float = _setting(
        3600.0, parse_duration,
        "at most this long a node waits for the node that pulls a model from the origin "
        "to put it in the mirror, before it pulls it itself"
    )
    mirror_lock_timeout: float = _setting(
        60.0, parse_duration,
        "a mirror lock not refreshed for this long is stale (its holder died) and is "
        "taken over"
    )
    chunk_size: int | None = _setting(
        None, _opt_size, "bytes per ranged read (default: chosen per protocol)"
    )
    concurrency: int | None = _setting(
        None, _opt_int, "whole chunks a model fetch reads at once to start with; it "
        "doubles them while that lands bytes faster, up to concurrency x "
        "max_parallel_files (default: chosen per protocol)"
    )
    max_parallel_files: int = _setting(4, _int, "files of one model fetched at once")
    retry_attempts: int = _setting(6, _int, "attempts per chunk before a fetch fails")
    retry_max_seconds: float = _setting(
        60.0, parse_duration, "time bound on the retries of one chunk"
    )
    fetch_workers: int = _setting(
        8, _int, "model fetches the daemon runs at once (the rest wait their turn)"
    )
    load_workers: int = _setting(
        8, _int, "loads and unloads (host memory, GPUs) the daemon runs at once; they never "
        "wait for fetches"
    )
    host_budget: int | None = _setting(
        None, _opt_size, "bytes the host tier may keep resident (default: half of the RAM)"
    )
    host_mlock: bool = _setting(True, _bool, "pin resident pages with mlock")
    disk_budget: int | None = _setting(
        None, _opt_size, "bytes the blobs may take; LRU models beyond it are evicted"
    )
    gpu_budget: str | None = _setting(
        None, _opt_budget, "per-GPU budget: bytes (40GiB) or a share of the device (default: 90%)"
    )
    staging_buffers: int = _setting(4, _int, "pinned host staging buffers for GPU loads")
    staging_buffer_size: int = _setting(
        64 * 1024 * 1024, _size, "bytes per pinned staging buffer"
    )
    gpu_register_host: bool = _setting(
        False, _bool, "copy to the GPU from the registered mmap instead of staging buffers"
    )
    watchdog: bool = _setting(
        True, _bool, "send systemd watchdog keep-alives when WATCHDOG_USEC is set"
    )
    metrics_address: str | None = _setting(
        None, _opt_address, "host:port for the Prometheus endpoint (default: none)"
    )
    log_level: str = _setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 64 * 1024:
            raise ConfigError(f"chunk_size must be at least 64KiB, got {self.chunk_size}")
        if self.concurrency is not None and not 1 <= self.concurrency <= 256:
            raise ConfigError(f"concurrency must be 1..256, got {self.concurrency}")
        if not 1 <= self.max_parallel_files <= 64:
            raise ConfigError(f"max_parallel_files must be 1..64, got {self.max_parallel_files}")
        if self.staging_buffers < 1 or self.staging_buffer_size < 1024 * 1024:
            raise ConfigError("staging_buffers must be >= 1 and staging_buffer_size >= 1MiB")
        for name in ("fetch_workers", "load_workers"):
            if not 1 <= getattr(self, name) <= 256:
                raise ConfigError(f"{name} must be 1..256, got {getattr(self, name)}")
        if self.retry_attempts < 1:
            raise ConfigError(f"retry_attempts must be at least 1, got {self.retry_attempts}")
        if (self.mirror_access_key_id is None) != (self.mirror_secret_access_key is None):
            raise ConfigError("mirror_access_key_id and mirror_secret_access_key go together: "
                              "set both, or neither")
        if self.mirror_access_key_id is not None and self.mirror_profile is not None:
            raise ConfigError("set mirror_access_key_id or mirror_profile, not both")
        if self.mirror_timeout <= 0 or self.mirror_lock_timeout <= 0:
            raise ConfigError("mirror_timeout and mirror_lock_timeout must be more than 0")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def settings() -> dict[str, dataclasses.Field[Any]]:
    """Every setting's field, by name."""
    return {f.name: f for f in dataclasses.fields(Config)}


#: Settings that were renamed or split: the old name's error says what replaced it.
RENAMED = {"cold_workers": "fetch_workers and load_workers (fetches and loads have a pool "
                           "each: a load never waits for a fetch)"}


def _parse_all(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    known = settings()
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key in RENAMED:
            raise ConfigError(f"{origin}: the setting {key!r} is now {RENAMED[key]}")
        if key not in known:
            raise ConfigError(f"{origin}: unknown setting {key!r} (known: {', '.join(known)})")
        try:
            out[key] = known[key].metadata["parse"](raw)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {key}: {e}") from e
    return out


def env_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings set in an environment: ``WEIGHTD_CACHE_DIR`` → ``cache_dir``.

    An unknown ``WEIGHTD_*`` variable is an error, so that a typo does not pass silently.
    """
    out = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != "WEIGHTD_CONFIG":
            out[key[len(ENV_PREFIX):].lower()] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from a TOML file, the environment and flag values.

    Args:
        path: a TOML file; default ``WEIGHTD_CONFIG`` if set, else none.
        environ: the environment to read ``WEIGHTD_*`` from (default ``os.environ``).
        overrides: values from flags; ``None`` values are ignored.

    Raises:
        ConfigError: a file that cannot be read, an unknown key, a bad value.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = path or environ.get("WEIGHTD_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        merged.update(_parse_all(data, str(path)))
    merged.update(_parse_all(env_values(environ), "environment"))
    merged.update(
        _parse_all({k: v for k, v in (overrides or {}).items() if v is not None}, "flags")
    )
    return Config(**merged)


def default_text(name: str) -> str | None:
    """A setting's default as a person writes it (``64MiB``, ``a,b``, the actual cache
    path), or None where it has no fixed one (its doc says what happens instead)."""
    field = settings()[name]
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:  # pragma: no cover - every setting has a default
        return None
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if field.metadata["parse"] in (_size, _opt_size):
        return _size_text(value)
    if field.metadata["parse"] is parse_duration:
        return f"{value:g}s"
    if isinstance(value, tuple):  # a list setting: as the flag and WEIGHTD_* take it
        return ",".join(str(v) for v in value)
    return str(value)


def _size_text(n: int) -> str:
    """A size as the settings take it: ``64MiB`` when it is a whole number of a unit."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return format_size(n)


_METAVARS: dict[Callable[[Any], Any], str] = {
    _size: "SIZE", _opt_size: "SIZE", _int: "N", _opt_int: "N", _float: "NUMBER",
    parse_duration: "DURATION", _bool: "BOOL", _path: "PATH", _opt_budget: "SIZE|SHARE",
    _str_list: "LIST", _opt_str: "TEXT", _opt_address: "HOST:PORT", _log_level: "LEVEL",
    _opt_path: "PATH", _mirror_urls: "LIST", _proxy_url: "URL",
}


def arg_type(name: str, parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a flag's value as the setting does, so that a
    bad value is a usage error with the setting's own message, before anything runs."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def add_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """Add a ``--kebab-case`` flag for every setting to a parser.

    Flags default to ``None`` so that an unset flag leaves the environment and file alone;
    with ``suppress`` (for subcommands) an unset flag does not touch the namespace at all,
    so ``weightd --cache-dir X ls`` and ``weightd ls --cache-dir X`` both work. Each value
    is parsed when the command line is (a bad size is a usage error); the help names the
    setting's environment variable and its default.
    """
    for name, field in settings().items():
        doc = field.metadata["doc"]
        default = default_text(name)
        if default is not None and "default" not in doc:
            doc = f"{doc} (default: {default})"
        parse = field.metadata["parse"]
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, metavar=_METAVARS.get(parse, "TEXT"),
            type=arg_type(name, parse), default=argparse.SUPPRESS if suppress else None,
            # a subcommand takes every setting too; only `weightd --help` lists them
            help=argparse.SUPPRESS if suppress else doc.replace("%", "%%"),  # argparse
        )                                                                  # %-formats help


def flag_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in a parsed namespace."""
    return {k: getattr(ns, k) for k in settings() if getattr(ns, k, None) is not None}
