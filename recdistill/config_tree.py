"""The dict-level machinery of the configuration: YAML trees merged, ``--set`` overrides parsed and applied, and
pydantic's validation errors turned into one line per fault naming the key, where its value came from and what
is allowed. recdistill/config.py builds the models on top of it; this module knows no section.
"""

from __future__ import annotations

import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from recdistill.errors import RecdistillError


class ConfigError(RecdistillError, ValueError):
    """A config file or override is invalid; the message names the key, the source and what is allowed."""

    exit_code = 2
    fix = "`recdistill config` lists every key with its description"


def model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for listing allowed keys)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return model if fields is not None else None
        ann = fields[part].annotation
        model = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:  # list[Model]
            for a in typing.get_args(ann):
                inner = [x for x in typing.get_args(a) if isinstance(x, type) and issubclass(x, BaseModel)]
                model = inner[0] if inner else model
    return model


def format_errors(err: ValidationError, sources: dict[str, str], root: type[BaseModel]) -> str:
    """One line per pydantic error: where the value came from (file or override), the key, what is wrong; an
    unknown key lists the keys allowed next to it (`root`: the top-level model)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        src = source_of(key, sources)
        if e["type"] == "extra_forbidden":
            owner = model_at(loc[:-1], root)
            allowed = sorted(owner.model_fields) if owner is not None else []
            lines.append(f"{src}: unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{src}: {key or '<root>'}: {e['msg']}{got_s}")
    return "invalid config:\n  " + "\n  ".join(lines)


def source_of(key: str, sources: dict[str, str]) -> str:
    """Where a key's value came from: the longest override/file key that prefixes it."""
    best = None
    for k in sources:
        if key == k or key.startswith(k + ".") or k.startswith(key + ".") or (k == "" and best is None):
            if best is None or len(k) > len(best):
                best = k
    return sources.get(best, "defaults") if best is not None else "defaults"


def flat_keys(d: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(flat_keys(v, key + ".") if isinstance(v, dict) and v else [key])
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value as YAML: numbers, bools, null, lists) into (path, value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set data.batch_size=256")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"--set {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return path, value


def apply_override(tree: dict, path: list[str], value: Any, origin: str) -> None:
    """Set `tree[path]` to `value` (a mapping merges into a mapping); `origin` names the override in errors."""
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: '{'.'.join(path[: i + 1])}' is a value, not a section")
        node = nxt
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        merge(node[path[-1]], value)
    else:
        node[path[-1]] = value


def factory_values(model: BaseModel) -> dict:
    """The explicitly set fields of `model` and, recursively, of its sub-models (JSON-ready)."""
    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = factory_values(value)
            if sub:
                out[name] = sub
        elif name in model.model_fields_set:
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def merge(base: dict, update: dict) -> None:
    """Recursively merge `update` into `base` (mappings merge, anything else replaces)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
