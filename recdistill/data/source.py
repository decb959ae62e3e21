"""What a sample source is, which sources exist, and how a sampled view is applied to what one returns.

    from recdistill.data.source import build_source, register_source
    src = build_source(cfg.data)            # the source named by data.source
    register_source("mine", "mypkg.data:MySource")   # a source of your own: a class taking the DataConfig

The registry maps names to "module:attribute" strings, imported on first use: this module imports no source, so
sources (and the loader, and the Parquet writer) can import it without cycles.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from recdistill.config import DataConfig, SamplingConfig
from recdistill.data.batch import Batch, Schema
from recdistill.data.sampling import keep_mask


@runtime_checkable
class DataSource(Protocol):
    """What a sample source provides (synthetic world, Parquet directory, MovieLens)."""

    schema: Schema
    #: The view that produced the stored rows (None: unsampled, every row of the population).
    sampling: SamplingConfig | None

    def days(self) -> list[int]:
        """Day numbers available, ascending."""
        ...

    def num_rows(self, day: int) -> int:
        """Rows stored for `day`."""
        ...

    def read(self, day: int, start: int, stop: int, view: SamplingConfig | None = None) -> Batch:
        """Rows [start, stop) of `day` as a Batch, in a fixed order. With `view`: only the rows the view keeps,
        equal to ``apply_view(read(day, start, stop), view, num_traffic)``, but the keep decision is taken from
        sample id, label and traffic before any history of a dropped row is made or converted (view pushdown)."""
        ...

    # Optional: `sparse_ids(day, start, stop) -> {feature: [n] int64}`, the single-valued sparse features of those
    # rows without labels or histories. The counting features (data.counts) read every stored row through it where
    # a source has it (synthetic, Parquet), else through `read`.


def stored_source(source: DataSource) -> DataSource:
    """The source that holds the rows: `source` itself, or the one a wrapper around it (data.counts' CountedSource)
    reads from. For checks that depend on the storage (a Parquet directory's files, the synthetic world's truth)."""
    return getattr(source, "inner", source)


def check_nested(view: SamplingConfig, base: SamplingConfig | None, num_traffic: int) -> None:
    """A view can only be applied to stored data that was sampled at rates >= the view's (same seed)."""
    if base is None:
        return
    if view.seed != base.seed:
        raise ValueError(f"sampling view '{view.name}' has seed {view.seed}, data was sampled with seed {base.seed}: "
                         "views with different seeds do not nest")
    if view.r > base.r or np.any(view.q_for(num_traffic) > base.q_for(num_traffic)):
        raise ValueError(f"sampling view '{view.name}' (r={view.r}, q_eff={view.q_for(num_traffic).tolist()}) keeps "
                         f"more than the data's own sampling '{base.name}' (r={base.r}, "
                         f"q_eff={base.q_for(num_traffic).tolist()}): dropped rows cannot be recovered")


def apply_view(batch: Batch, view: SamplingConfig | None, num_traffic: int) -> Batch:
    """Rows of `batch` kept by `view` (deterministic in sample_id, so nested views give subsets)."""
    if view is None:
        return batch
    positive = batch.labels[view.task].numpy() > 0.5
    keep = keep_mask(batch.sample_id.numpy(), positive, batch.traffic.numpy(), view, num_traffic)
    out = batch.select(torch.from_numpy(keep))
    out.sampling = view
    return out


def read_view(source: DataSource, day: int, start: int, stop: int, view: SamplingConfig | None) -> Batch:
    """Rows [start, stop) of `day` kept by `view`: pushed down into the source when its `read` takes `view` (every
    built-in source does), else applied after a full read (a registered source written before pushdown)."""
    if view is None:
        return source.read(day, start, stop)
    if _takes_view(type(source)):
        return source.read(day, start, stop, view=view)
    return apply_view(source.read(day, start, stop), view, source.schema.num_traffic)


@functools.cache
def _takes_view(cls: type) -> bool:
    return "view" in inspect.signature(cls.read).parameters


def phase_days(days: list[int], eval_days: int, stream_days: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(batch training days, batch evaluation days, streaming days) of a source's `days`. Without a streaming phase:
    all but the last `eval_days`, the last `eval_days`, none. With one: the streaming days are the `stream_days`
    before the last `eval_days`; the batch phase trains on the days before them and evaluates on the first
    `eval_days` of them (its next days), and streaming day d is evaluated on d + 1."""
    if stream_days < 0 or eval_days < 1 or len(days) < eval_days + stream_days + 1:
        raise ValueError(f"{len(days)} days cannot hold {eval_days} evaluation day(s), {stream_days} streaming day(s) "
                         "and at least one batch training day")
    cut = len(days) - eval_days - stream_days
    return days[:cut], days[cut:cut + eval_days], days[cut:len(days) - eval_days]


#: data.source name -> "module:attribute" of a callable taking the DataConfig and returning a DataSource.
SOURCES: dict[str, str] = {
    "synthetic": "recdistill.data.world:SyntheticWorld",
    "parquet": "recdistill.data.parquet:ParquetSource.from_config",
    "movielens": "recdistill.data.movielens:MovieLensSource",
}


def register_source(name: str, target: str) -> None:
    """Make `data.source=name` build `target` ("module:attribute", called with the DataConfig)."""
    if ":" not in target:
        raise ValueError(f"register_source({name!r}, {target!r}): expected 'module:attribute'")
    SOURCES[name] = target


def _resolve(target: str) -> Callable[[DataConfig], DataSource]:
    module, attr = target.split(":", 1)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_source(data_cfg: DataConfig) -> DataSource:
    """The data source named by `data_cfg.source`."""
    if data_cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {data_cfg.source!r}; known sources: {sorted(SOURCES)}")
    source = _resolve(SOURCES[data_cfg.source])(data_cfg)
    if data_cfg.counts:
        from recdistill.data.counts import CountedSource, cache_path
        from recdistill.data.roles import resolve_roles
        source = CountedSource(source, resolve_roles(data_cfg.roles, source),
                               standardise=data_cfg.count_scale == "standard", window=data_cfg.count_window,
                               cache=cache_path(data_cfg) if data_cfg.count_cache else None)
    return source
