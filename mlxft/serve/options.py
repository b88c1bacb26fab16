"""`mlxft serve`'s options as the CLI reads them: adapters by name and from a folder, the base model
they name, CORS origins, and whether an address is loopback."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from mlxft.errors import UserError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def adapter_options(values: list[str], folder: Path | None = None) -> tuple[Path | None, dict[str, Path]]:
    """`--adapter [NAME=]PATH` (repeated) and `--adapters-dir DIR` as (the default adapter's path
    or None, {name: path}); one-line errors for a repeated name or a second unnamed adapter."""
    default, named = None, {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and ADAPTER_NAME.fullmatch(name) and not Path(value).exists():
            if name in named:
                raise UserError(f"--adapter {value}: the name '{name}' is given twice")
            named[name] = Path(path)
        elif default is not None:
            raise UserError(f"--adapter {value}: a second adapter without a name; name it, --adapter NAME={value}")
        else:
            default = Path(value)
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"--adapters-dir {folder}: not a folder")
        found = sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())
        if not found:
            raise UserError(f"--adapters-dir {folder}: no subfolder holds an adapter_config.json")
        for path in found:
            if path.name in named or not ADAPTER_NAME.fullmatch(path.name):
                raise UserError(f"--adapters-dir {folder}: '{path.name}' is " +
                                ("named twice" if path.name in named else "not a usable name (letters, digits, . _ : -)"))
            named[path.name] = path
    return default, named


def base_model_of(default: Path | None, named: dict[str, Path]) -> str | None:
    """The base model the adapters were trained on (adapter_config.json), when --model is not given:
    the default adapter's, else the one every named adapter names; None: the built-in model."""
    from mlxft.models.adapters import CONFIG_FILE, adapter_folder

    def base(path: Path) -> str:
        try:
            return json.loads((adapter_folder(path) / CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            return ""  # unreadable here: loading the adapter says why

    if default is not None:
        return base(default) or None
    bases = {base(path) for path in named.values()}
    if len(bases) > 1:
        raise UserError(f"the adapters name different base models ({', '.join(sorted(b or '?' for b in bases))}); give --model")
    return next(iter(bases), "") or None


ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", re.IGNORECASE)  # http(s), app://, chrome-extension://


def check_origins(origins) -> tuple[str, ...]:
    """--cors-origin values as a browser sends Origin (scheme://host[:port], no path), or `*`."""
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise UserError(f"--cors-origin {origin!r}: give an origin as a browser sends it, like https://app.example "
                            "or http://localhost:3000 (no path, no trailing slash), or '*' for any")
    return tuple(origin.lower() for origin in origins)  # a browser sends scheme and host in lower case


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
