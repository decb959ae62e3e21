"""Crossed categorical features: one embedding row per combination of a few low-vocabulary features.

An effect that lives only in the combination of three fields (every one- and two-field part zero) gives gradient
descent over the fields' own embeddings no first-order signal to follow: a one-pass teacher finds it late or never
(benchmarks/interaction_learnability.py). A table indexed by the combination learns such an effect as easily as an
item effect. This is what production rankers do with explicit crossed-id features; what gets crossed is chosen by
vocabulary size alone (every pair and triple of the features with at most `max_vocab` ids), never by which
features interact in a given data set.

Each row contributes the first id of each crossed feature (a row with no id contributes the value `cardinality`,
"missing"), combined in mixed radix; a cross whose combinations outnumber `buckets` is hashed into `buckets` rows.
Pure tensor code: the cross ids are computed in the model's forward, so sharding treats cross tables like any other.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_HASH_MUL = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio multiplier as a signed int64 (torch wraps on overflow)


@dataclass(frozen=True)
class Cross:
    """One crossed feature: its name (a sparse feature name of its own), the features it crosses, each one's
    radix (cardinality + 1 for "missing") and its table size."""

    name: str
    fields: tuple[str, ...]
    radices: tuple[int, ...]
    size: int

    @property
    def hashed(self) -> bool:
        return self.size < math.prod(self.radices)


def plan_crosses(cardinalities: Mapping[str, int], spec: str | Sequence[Sequence[str]], *, max_vocab: int,
                 order: int, buckets: int, sort_key=None) -> list[Cross]:  # noqa: ANN001 - a key function
    """The crosses of `spec` over the sparse features `cardinalities` ({name: number of ids}).

    spec "none": no crosses. "auto": every combination of 2..`order` features whose cardinality is at most
    `max_vocab`. A list of feature lists: exactly those crosses (names checked). `sort_key` orders the features
    inside a cross and the crosses among themselves (the teacher passes its role-aware order, so renaming columns
    does not change the model)."""
    key = sort_key or (lambda f: f)
    if spec == "none":
        groups: list[tuple[str, ...]] = []
    elif spec == "auto":
        small = sorted((f for f, n in cardinalities.items() if n <= max_vocab), key=key)
        groups = [g for k in range(2, order + 1) for g in itertools.combinations(small, k)]
    else:
        groups = []
        for g in spec:
            unknown = sorted(set(g) - set(cardinalities))
            if unknown or len(set(g)) < 2:
                raise ValueError(f"teacher.crosses: {list(g)} must name at least two distinct sparse features of the "
                                 f"data; {unknown or 'too few'} (the data has {sorted(cardinalities)})")
            groups.append(tuple(sorted(set(g), key=key)))
    out = []
    for g in groups:
        radices = tuple(cardinalities[f] + 1 for f in g)
        out.append(Cross(name="cross__" + "__".join(g), fields=g, radices=radices,
                         size=min(math.prod(radices), buckets)))
    return out


def first_ids(kjt: KeyedJaggedTensor, cardinalities: Mapping[str, int], features: Sequence[str]
              ) -> dict[str, torch.Tensor]:
    """Per row, the first id of each feature in `features` ([B] int64); `cardinality` where a row has none."""
    out = {}
    for f in features:
        jt = kjt[f]
        lengths, values = jt.lengths(), jt.values()
        missing = torch.full_like(lengths, cardinalities[f], dtype=torch.int64)
        if values.numel() == 0:
            out[f] = missing
            continue
        start = jt.offsets()[:-1].clamp(max=values.numel() - 1)
        out[f] = torch.where(lengths > 0, values[start].to(torch.int64), missing)
    return out


def first_or_missing(values: torch.Tensor, lengths: torch.Tensor, cardinality: int) -> torch.Tensor:
    """`first_ids` on plain jagged tensors (values [N], lengths [B]), without a data-dependent branch so that an
    exported program keeps every size dynamic: one id is appended so an empty last row can be read."""
    padded = torch.cat([values.to(torch.int64), values.new_zeros(1, dtype=torch.int64)])
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.where(lengths > 0, padded[starts], torch.full_like(lengths, cardinality, dtype=torch.int64))


def cross_ids(cross: Cross, ids: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The row of `cross`'s table for each sample ([B] int64): the mixed-radix code of its fields' ids, hashed
    into `cross.size` rows when the code space is larger."""
    code = torch.zeros_like(ids[cross.fields[0]])
    for f, r in zip(cross.fields, cross.radices, strict=True):
        code = code * r + ids[f]
    if cross.hashed:
        code = torch.remainder((code + 1) * _HASH_MUL, cross.size)
    return code


def crossed_kjt(kjt: KeyedJaggedTensor, crosses: Sequence[Cross], cardinalities: Mapping[str, int]
                ) -> KeyedJaggedTensor:
    """`kjt` with one more key per cross (one id per row)."""
    if not crosses:
        return kjt
    needed = sorted({f for c in crosses for f in c.fields})
    ids = first_ids(kjt, cardinalities, needed)
    b = kjt.stride()
    extra = KeyedJaggedTensor(keys=[c.name for c in crosses],
                              values=torch.cat([cross_ids(c, ids) for c in crosses]),
                              lengths=torch.ones(b * len(crosses), dtype=kjt.lengths().dtype, device=kjt.device()))
    return KeyedJaggedTensor.concat([kjt, extra])
