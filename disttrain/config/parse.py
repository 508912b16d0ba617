"""Reading a stage's config: `key=value` overrides on a preset on the defaults, type coercion,
required and range checks, `--help` / `--print-config`, and the saved `config.json`.

A recipe calls `parse_cli(TrainClassifierConfig, sys.argv[1:])`. The result is a fully
resolved, validated dataclass; every mistake a user can make on the command line
(unknown key, wrong type, value outside its choices, an impossible combination) raises
`ConfigError` naming the key and what is allowed, before anything is built.

Nothing here knows a stage: the dataclasses' field types drive the parsing, the stage's own
`validate` adds its cross-field checks, and the presets come from the registry in `stages`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from disttrain import files
from disttrain.config.sections import REQUIRED
from disttrain.config.stages import presets_for
from disttrain.errors import ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list like [a,b] of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Turn `raw` (a CLI string or a preset value) into a value of type `tp`, or raise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            try:
                if _coerce(key, raw, type(choice)) == choice:
                    return choice
            except ConfigError:
                continue
        raise ConfigError(f"{key}={raw!r} is not allowed: expected {_describe(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(raw, str):
            text = raw.strip()
            if not (text.startswith("[") and text.endswith("]")):
                raise ConfigError(f"{key}={raw!r}: expected {_describe(tp)}")
            raw = [part.strip() for part in text[1:-1].split(",") if part.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}={raw!r}: expected {_describe(tp)}")
        return [_coerce(f"{key}[{i}]", item, item_tp) for i, item in enumerate(raw)]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={raw!r}: expected a bool (true/false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected an int")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an int") from None
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a float") from None
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}={raw!r}: expected a string")
        return raw
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def keys_of(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config dataclass."""
    out = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            out += keys_of(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def set_key(cfg: Any, key: str, raw: Any) -> None:
    """Set a dotted key on a config instance, converting and checking the value."""
    parts = key.split(".")
    node, cls = cfg, type(cfg)
    for depth, part in enumerate(parts):
        types = _field_types(cls)
        if part not in types:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key {key!r}: {where} has {allowed}")
        tp = types[part]
        if depth == len(parts) - 1:
            if _is_dataclass_type(tp):
                raise ConfigError(f"{key!r} is a section; set one of its keys: {', '.join(keys_of(tp, key + '.'))}")
            setattr(node, part, _coerce(key, raw, tp))
            return
        if not _is_dataclass_type(tp):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])!r} is not a section, so {key!r} does not exist")
        node, cls = getattr(node, part), tp


def _check_required(cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_required(value, f"{prefix}{f.name}.")
        elif value == REQUIRED:
            raise ConfigError(f"{prefix}{f.name} is required: pass {prefix}{f.name}=<value> or a --preset that sets it")



def build(cls: type, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults, then the preset, then the overrides; then validation."""
    cfg = resolve(cls, preset, overrides)
    _check_required(cfg)
    _check_ranges(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    cfg.PRESET = preset or ""  # not a field: tracking tags the run with it
    return cfg


# Ranges of numeric fields, by field name wherever it appears: (lowest, lowest allowed?, highest,
# highest allowed?); None is unbounded. A stage's own `validate` adds what depends on several fields.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "global_size": (0, False, None, False), "micro_size": (0, False, None, False),
    "lr": (0, False, None, False), "weight_decay": (0, True, None, False), "momentum": (0, True, 1, False),
    "warmup_steps": (0, True, None, False), "num_epochs": (0, True, None, False), "max_steps": (0, True, None, False),
    "num_workers": (0, True, None, False), "image_size": (1, True, None, False), "resize_size": (1, True, None, False),
    "max_bad_fraction": (0, True, 1, True), "keep_last": (1, True, None, False), "every_steps": (0, True, None, False),
    "every_minutes": (0, True, None, False), "log_every": (1, True, None, False), "eval_every": (0, True, None, False),
    "ema_decay": (0, True, 1, False), "grad_clip": (0, True, None, False), "max_skipped_steps": (0, True, None, False),
    "stall_timeout_minutes": (0, True, None, False), "heartbeat_seconds": (0, False, None, False),
    "stop_grace_seconds": (0, False, None, False),
}


def _check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric field named in `_RANGES` inside its range (NaN never is)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
            continue
        if f.name not in _RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, low_ok, high, high_ok = _RANGES[f.name]
        fits = value == value  # NaN fails
        if low is not None:
            fits = fits and (value >= low if low_ok else value > low)
        if high is not None:
            fits = fits and (value <= high if high_ok else value < high)
        if not fits:
            left = "unbounded" if low is None else f"{'[' if low_ok else '('}{low:g}"
            right = "" if high is None else f", {high:g}{']' if high_ok else ')'}"
            wanted = (f"in {left}{right}" if high is not None
                      else f"{'>=' if low_ok else '>'} {low:g}")
            raise ConfigError(f"{prefix}{f.name}={value} must be {wanted}")


def _parse_args(argv: list[str]) -> tuple[str | None, dict[str, str], set[str]]:
    """(preset, key=value overrides, flags among --help / --print-config)."""
    preset, overrides, flags = None, {}, set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            flags.add("--help")
            continue
        if arg == "--print-config":
            flags.add(arg)
            continue
        if arg == "--preset" or arg.startswith("--preset="):
            preset = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            continue
        if arg.startswith("-") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: expected --preset NAME, key=value, --print-config "
                              f"or --help")
        key, value = arg.split("=", 1)
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
    return preset, overrides, flags


def parse_cli(cls: type, argv: list[str]) -> Any:
    """`--preset NAME key=value ...` -> a validated config.

    `--help` lists the presets and every key with its value (the preset's and the overrides'
    when given); `--print-config` prints the resolved values, then checks them as a run would
    (a ConfigError: exit 2). Neither runs anything; only rank 0 prints.
    """
    preset, overrides, flags = _parse_args(argv)
    if not flags:
        return build(cls, preset, overrides)
    cfg = resolve(cls, preset, overrides)
    if os.environ.get("RANK", "0") == "0":
        print(usage(cls, cfg, preset) if "--help" in flags else describe(cfg, preset), flush=True)
    if "--help" not in flags:
        build(cls, preset, overrides)
    raise SystemExit(0)


def resolve(cls: type, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults, then the preset, then the overrides -- without the checks of `build`."""
    cfg = cls()
    if preset is not None:
        presets = presets_for(cls)
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {cls.STAGE}: choose one of {', '.join(presets)}")
        for key, value in presets[preset].items():
            set_key(cfg, key, value)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    return cfg


def describe(cfg: Any, preset: str | None = None) -> str:
    """The resolved values, one `key = value` per line (a required value nobody set shows as ???)."""
    header = f"# {cfg.STAGE}" + (f" --preset {preset}" if preset else "") + ": resolved config"
    return "\n".join([header, *(f"{key} = {value!r}" for key, value in to_dict(cfg).items())])


def usage(cls: type, cfg: Any = None, preset: str | None = None) -> str:
    cfg = cfg if cfg is not None else cls()
    lines = [f"usage: accelerate launch recipes/{cls.STAGE}.py [--preset NAME] [key=value ...] [--print-config]",
             f"presets: {', '.join(presets_for(cls))}",
             f"keys{f' (with --preset {preset})' if preset else ''}:"]
    flat = to_dict(cfg)
    lines += [f"  {key} = {flat[key]!r}" for key in keys_of(cls)]
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Flat {dotted.key: value}: the form MLflow params and the saved config use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in to_dict(value).items()})
        else:
            out[f.name] = value
    return out


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    files.write_text(path, json.dumps({"stage": cfg.STAGE, "config": to_dict(cfg)}, indent=2, sort_keys=True))


def load(cls: type, path: str | os.PathLike) -> Any:
    """Read a config saved by `save` (e.g. from an earlier stage's run dir)."""
    data = json.loads(Path(path).read_text())
    if data.get("stage") != cls.STAGE:
        raise ConfigError(f"{path} holds a {data.get('stage')!r} config, not {cls.STAGE!r}")
    return build(cls, None, data["config"])


