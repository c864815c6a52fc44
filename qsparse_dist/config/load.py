"""Load a YAML run config, apply ``key.path=value`` overrides, validate, and report errors by field.

Override values are parsed as YAML scalars (``parallel.tp=2`` → int, ``sparsity.linear=bitnet`` →
str, ``model.moe=null`` → None).  All errors become :class:`ConfigError` whose message lists each
offending dotted field with the reason and, for choice fields, the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError
from .schema import RunConfig

__all__ = ["ConfigError", "load_config", "parse_overrides", "config_from_dict", "dump_config"]


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/*.yaml for the schema)"
        got = e.get("input")
        suffix = f" (got {got!r})" if e["type"] not in ("extra_forbidden", "value_error", "missing") and not isinstance(got, dict) else ""
        lines.append(f"  {loc}: {msg}{suffix}")
    return "invalid config:\n" + "\n".join(lines)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}``."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is set both as a value and a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: Any, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a mapping (plus overrides) into a :class:`RunConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping, got {type(data).__name__}")
    data = _merge(data, parse_overrides(list(overrides)))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (YAML; an empty or comment-only file is an error naming it) or start from defaults
    when ``None``; apply overrides; validate."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if data is None:  # an empty or comment-only file is a mistake, not "all defaults"
            raise ConfigError(f"config file {p} is empty (no settings, only blanks or comments); put the run's "
                              "settings in it (see configs/*.yaml), or omit --config to use the defaults")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections, "
                              f"got {type(data).__name__}")
    return config_from_dict(data, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (what a run directory stores)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
