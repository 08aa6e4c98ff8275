"""The config's building blocks: durations, sizes, addresses, the base model."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# re.ASCII: with plain IGNORECASE, "KİB" matches and its .lower() is not a key.
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def redact_url(url: str) -> str:
    """`url` without the credentials or query it may carry (for messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<a URL>" if "@" in url else url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "<redacted>@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{path}"


def parse_duration(value: Any, *, allow_zero: bool = False) -> float:
    """`250ms`, `2s`, `1.5m`, `1h` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m is None:
            raise ValueError(f"expected a duration such as 250ms, 2s or 1m, found {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(
            "a duration must not be negative"
            if allow_zero
            else "a duration must be greater than zero"
        )
    return seconds


def _parse_duration_or_zero(value: Any) -> float:
    return parse_duration(value, allow_zero=True)


def parse_size(value: Any) -> int:
    """`16KiB`, `1MiB` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 8KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"expected a size such as 8KiB or 1MiB, found {value!r}")
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError("expected a size such as 8KiB or 1MiB")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
DurationOrZero = Annotated[float, BeforeValidator(_parse_duration_or_zero)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _parse_address(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """`host:port`, `:port`, `port` or `[v6]:port` -> (host, port)."""
    text = value.strip()
    if text.isdigit():
        host, port_s = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ipv6]:port, found {value!r}")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, found {value!r}")
        host = host or default_host
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected a port number from 0 to 65535, found {port_s!r}")
    return host, int(port_s)


class Address(_Model):
    """A socket address to listen on."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, str | int):
            host, port = _parse_address(str(value))
            return {"host": host, "port": port}
        return value

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ListenAddress = Annotated[Address, BeforeValidator(Address.parse)]
