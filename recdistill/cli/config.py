"""`recdistill config`: the resolved configuration, each field with its description.

    recdistill config                                   # built-in defaults
    recdistill config --config configs/demo.yaml --set teacher.lr=3e-3
    recdistill config --config configs/demo.yaml --yaml # plain YAML (what a run saves as config.yaml)

The listing is generated from the pydantic models in recdistill/config.py, so it is the configuration reference.
"""

from __future__ import annotations

import json

import yaml
from pydantic import BaseModel

from recdistill.config import add_config_arguments, config_from_args


def describe(model: BaseModel, indent: int = 0) -> list[str]:
    """`key: value  # description` lines for every field of `model`, sections as nested blocks."""
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        doc = (field.description or "").strip()
        if isinstance(value, BaseModel):
            head = f"{pad}{name}:"
            lines.append(f"{head}  # {doc}" if doc else head)
            lines.extend(describe(value, indent + 1))
            continue
        shown = json.dumps(model.model_dump(mode="json", include={name})[name])
        lines.append(f"{pad}{name}: {shown}" + (f"  # {doc}" if doc else ""))
    return lines


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print the resolved config (annotated, or plain YAML with --yaml)."""
    cfg = config_from_args(args)
    if args.yaml:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    else:
        print("\n".join(describe(cfg)))
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill config`."""
    p = sub.add_parser("config", help="print the resolved config with each field's description")
    add_config_arguments(p)
    p.add_argument("--yaml", action="store_true", help="plain YAML, no descriptions")
    p.set_defaults(func=run)
