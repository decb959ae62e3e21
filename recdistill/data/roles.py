"""Feature roles: which sparse features and history fields are the user, the item and its category (DESIGN §4).

    from recdistill.data.roles import resolve_roles, report_roles
    roles = resolve_roles(cfg.data.roles, source)          # config over the source's defaults, validated
    report_roles(roles, cfg.data.roles, source.schema, "teacher")   # once at start: what a missing role costs
    roles = roles_for(cfg.data.roles, source, "teacher")   # both (what the trainers call)

A source declares its defaults as a `roles` attribute (a `Roles`); one without it is read with the conventional
names (user_id, item_id, item_cat; history item, cat, action) where the data has them. The models take the
resolved `Roles` and never look a feature up by a literal name.
"""

from __future__ import annotations

import os
import sys

from recdistill.config import ConfigError, RolesConfig
from recdistill.data.batch import CONVENTIONAL_ROLES, Roles, Schema

#: A role a model cannot do without (missing: an error whatever data.roles.strict says).
REQUIRED = "required"

#: What each model loses when a role resolves to nothing (read off the models: recdistill/models/teacher.py,
#: student.py). No entry: that model does not use the role.
LOSSES: dict[str, dict[str, str]] = {
    "user": {"teacher": "its user LONGER query"},
    "item": {"teacher": "its candidate-item LONGER query",
             "student": "its target attention (the history mean stands in for the candidate)"},
    "category": {"teacher": "its candidate-category LONGER query and the target-match statistics",
                 "student": "the target-match statistics"},
    "hist_item": {"teacher": REQUIRED, "student": "the events' item embeddings and its target attention"},
    "hist_category": {"teacher": "the events' category embeddings and the target-match statistics",
                      "student": "the events' category embeddings and the target-match statistics"},
    "hist_action": {"teacher": "the events' action embeddings", "student": "the events' action embeddings"},
}


def source_roles(source) -> Roles:  # noqa: ANN001 - a DataSource
    """The roles a source declares (its `roles` attribute), else the conventional names its schema has."""
    declared = getattr(source, "roles", None)
    return declared if declared is not None else CONVENTIONAL_ROLES.present_in(source.schema)


def _names(schema: Schema, role: str) -> dict[str, int]:
    return schema.sparse if role in Roles.SPARSE else schema.history


def resolve_roles(cfg: RolesConfig, source) -> Roles:  # noqa: ANN001 - a DataSource
    """The roles the models use: each `data.roles` field that is set, else the source's default.

    A set role naming a sparse feature or history field the data does not have is a ConfigError naming the key,
    the value and what the data has.
    """
    defaults, schema = source_roles(source), source.schema
    out = {}
    for role, default in defaults.as_dict().items():
        value = getattr(cfg, role)
        if value is not None and value not in _names(schema, role):
            kind = "sparse feature" if role in Roles.SPARSE else "history field"
            prefix = "sparse_" if role in Roles.SPARSE else "hist_"
            raise ConfigError(f"data.roles.{role}={value!r}: the data has no {kind} {value!r} (column "
                              f"'{prefix}{value}'); its {kind}s: {sorted(_names(schema, role))}")
        out[role] = value if value is not None else default
    roles = Roles(**out)
    roles.check(schema)  # a source's own defaults must name what it has too
    return roles


def _message(role: str, schema: Schema, model: str) -> str:
    """What a missing `role` costs `model`, and the key to set."""
    lost = LOSSES[role][model]
    conventional, names = getattr(CONVENTIONAL_ROLES, role), _names(schema, role)
    kind = "sparse feature" if role in Roles.SPARSE else "history field"
    why = (f"the data has no '{conventional}' {kind}" if conventional not in names
           else "the data declares none")  # a source may declare a role absent although the name exists
    cost = f"the {model} needs it" if lost == REQUIRED else f"the {model} loses {lost}"
    return f"data.roles.{role} is not set and {why}: {cost}; set data.roles.{role}=<{kind}> ({kind}s: {sorted(names)})"


def missing_roles(roles: Roles, schema: Schema, model: str) -> tuple[list[str], list[str]]:
    """(capabilities `model` ('teacher' or 'student') loses, roles it cannot do without), one message per role
    that resolved to nothing."""
    lost, required = [], []
    for role, value in roles.as_dict().items():
        if value is None and model in LOSSES[role]:
            (required if LOSSES[role][model] == REQUIRED else lost).append(_message(role, schema, model))
    return lost, required


def report_roles(roles: Roles, cfg: RolesConfig, schema: Schema, model: str, rank: int | None = None) -> list[str]:
    """Say once, at start, what `model` loses to missing roles (a warning line on stderr, rank 0 only: stdout may be
    a JSON report); with `cfg.strict`, or for a role the model cannot do without, a ConfigError with the same text.
    Returns the warnings. `rank` None: the RANK environment variable (torchrun sets it), else 0."""
    lost, required = missing_roles(roles, schema, model)
    if required or (lost and cfg.strict):
        head = "a role is missing" if required else "data.roles.strict is set and a role is missing"
        raise ConfigError(f"{head}:\n  " + "\n  ".join(required + (lost if cfg.strict else [])))
    if (rank if rank is not None else int(os.environ.get("RANK", "0"))) == 0:
        for m in lost:
            print(f"warning: {m}", file=sys.stderr, flush=True)
    return lost


def roles_for(cfg: RolesConfig, source, model: str, rank: int | None = None) -> Roles:  # noqa: ANN001 - DataSource
    """The resolved roles a trainer builds `model` ('teacher' or 'student') with, after reporting what is missing."""
    roles = resolve_roles(cfg, source)
    report_roles(roles, cfg, source.schema, model, rank)
    return roles
