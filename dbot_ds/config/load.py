"""Loading a Config: a preset or YAML file, then `section.key=value` overrides, type-checked and validated.

Unknown keys and values of the wrong type fail with a message that names the key (and close matches).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from .schema import ARCHS, Config, ConfigError
from .validate import validate

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


# ----------------------------------------------------------------------------------------------------------
# Loading and overriding


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(sorted(choices))}."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert `value` (from YAML or a CLI string) to `typ`, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (item,) = typing.get_args(typ)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(key, v, item) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise TypeError
        if typ is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unsupported config type {typ}")
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """{'model': {'depth': 4}} -> {'model.depth': 4}, rejecting anything that is not section.key."""
    flat = {}
    sections = [f.name for f in dataclasses.fields(Config)]
    for section, body in (raw or {}).items():
        if section not in sections:
            raise _unknown(section, sections)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _valid_keys() -> dict[str, Any]:
    keys = {}
    for section in dataclasses.fields(Config):
        cls = _resolve(Config, section.name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section.name}.{f.name}"] = hints[f.name]
    return keys


def zero_name(value: str) -> str:
    """One spelling for the ZeRO stage across tools: '2' or 'zero2' -> 'zero2'; 'zero3_offload' and JSON paths pass
    through. dbot-plan, dbot-bench and deepspeed.config all accept either form."""
    value = str(value).strip()
    return f"zero{value}" if value in ("0", "1", "2", "3") else value


def preset_names() -> list[str]:
    return sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['optim.blr=1e-4', ...] -> {'optim.blr': '1e-4'}; each item must be section.key=value, each key once."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.micro_batch=64)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in out:
            raise ConfigError(f"{key} is given twice ({out[key]!r} and {value!r}); give each key once. An unquoted "
                              "brace pattern is expanded by the shell into one override per shard: quote it, e.g. "
                              "data.shards='/data/shard-{000000..000009}.tar'")
        out[key] = value
    return out


# A stage length or warmup given on the command line replaces the file's other form of it (epochs <-> steps), so
# switching a preset from epochs to steps takes one override, not four.
_EXCLUSIVE = {"schedule.stage_steps": "schedule.stage_epochs", "schedule.stage_epochs": "schedule.stage_steps",
              "schedule.warmup_steps": "schedule.warmup_epochs", "schedule.warmup_epochs": "schedule.warmup_steps"}


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key in overrides:
        other = _EXCLUSIVE.get(key)
        if other and other not in overrides:
            out.pop(other, None)
    out.update(overrides)
    if "schedule.stage_steps" in overrides and "schedule.warmup_epochs" in raw and not any(
            k in overrides for k in ("schedule.warmup_epochs", "schedule.warmup_steps")):
        out.pop("schedule.warmup_epochs")        # epochs-based warmup cannot go with steps-based stages
    return out


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build the run's Config from a preset name or YAML file plus CLI overrides; validate it."""
    if path and preset:
        raise ConfigError("give either --config or --preset, not both")
    raw: dict[str, Any] = {}
    if preset:
        p = PRESET_DIR / f"{preset}.yaml"
        if not p.exists():
            raise ConfigError(f"unknown preset '{preset}'; shipped presets: {', '.join(preset_names())}")
        path = p
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        raw = _flatten(yaml.safe_load(p.read_text()) or {}, str(p))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(_apply_overrides(raw, overrides or {}))


def build_config(flat: dict[str, Any]) -> Config:
    """Flat {'section.key': value} -> validated Config (arch preset applied under explicit keys)."""
    valid = _valid_keys()
    for key in flat:
        if key not in valid:
            raise _unknown(key, list(valid))
    cfg = Config()
    arch = _coerce("model.arch", flat.get("model.arch", cfg.model.arch), str)
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, list(ARCHS), n=3, cutoff=0.5)
        raise ConfigError(f"unknown model.arch '{arch}'. Did you mean: {', '.join(close or ARCHS)}? "
                          "(or set model.embed_dim, model.depth, ... yourself on top of the closest one)")
    values = {f"model.{k}": v for k, v in ARCHS[arch].items()}
    values.update(flat)
    for key, value in values.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(key, value, valid[key]))
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_diff(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> dict[str, tuple[Any, Any]]:
    """{'model.depth': (12, 24), ...} for the dotted keys (or whole sections) that differ between two dicts.
    A key the old dict predates (a checkpoint from before the key existed) is not compared."""
    out = {}
    flat_old, flat_new = _flat_dict(old), _flat_dict(new)
    for k in sorted(flat_old):
        if any(k == p or k.startswith(p + ".") for p in keys) and flat_old.get(k) != flat_new.get(k):
            out[k] = (flat_old.get(k), flat_new.get(k))
    return out


def _flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
