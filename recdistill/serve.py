"""The served student as an artefact: export it (torch.export program + JSON sidecar), load it, score data with it.

    recdistill predict --model runs/x/student_main_tower.pt2 --data DIR --out preds.parquet
    recdistill predict --model runs/x/student_main_tower.pt2 --config configs/demo.yaml --out preds.parquet

Artefact: ``<name>.pt2`` is a torch.export program of `ServedStudent` (backbone + main tower, sampling correction
inside); ``<name>.json`` beside it is its `ServingSpec`: which features, history fields and history length the
program reads, in which order, and which tasks (and kinds) its output columns are. The program's inputs are
`serving_inputs(spec, batch)` (recdistill/models/student.py): per-feature ids and row lengths, dense [B, Fd],
right-aligned history ids [B, n] per field with their mask, the long-history summary [B, C] (category counts of
the user's last `summary_len` events, [B, 0] without one), traffic [B]; its output is [B, num_tasks], true-space
probabilities for binary tasks and values for continuous ones. Every size but n is dynamic.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recdistill.data.batch import Batch, Schema
from recdistill.data.loader import BatchLoader
from recdistill.data.parquet import DataError
from recdistill.data.source import DataSource
from recdistill.models.student import ServedStudent, StudentModel, serving_inputs
from recdistill.tracking import progress

SPEC_FORMAT, SPEC_VERSION = "recdistill.served_student", 2
#: Rows of the synthetic batch an export traces with (see `example_inputs`).
EXAMPLE_BATCH = 6
#: Rows buffered before a Parquet row group is written (a few MB of predictions: large enough for fast reads).
ROW_GROUP_ROWS = 65536


class ServeError(ValueError):
    """An exported student cannot be written or read (failed export, missing or foreign sidecar)."""


@dataclass(frozen=True)
class ServingSpec:
    """What a caller needs to feed an exported student and read its output (the JSON sidecar)."""

    features: list[str]  # sparse features, in the order of the program's values / lengths inputs
    sparse_cardinality: dict[str, int]  # ids of a feature must lie in [0, cardinality): the table's rows
    hist_fields: list[str]  # history fields (without the hist_ prefix) the program reads
    history_cardinality: dict[str, int]
    history_len: int  # n: the most recent events, right-aligned in [B, n]
    dense: list[str]  # dense features, in the order of the columns of the dense input
    tasks: list[str]  # output columns, in order
    kinds: dict[str, str]  # task -> binary (output is a probability) | continuous (output is the value)
    num_traffic: int  # traffic ids must lie in [0, num_traffic): the correction has one entry each
    summary_len: int = 0  # the summary input counts the categories of the last summary_len events (0: no summary)
    summary_field: str | None = None  # the history field whose ids the summary counts
    summary_cats: int = 0  # C: the summary input is [B, C]

    @classmethod
    def of(cls, model: StudentModel, schema: Schema) -> ServingSpec:
        """The spec of `model` trained on data of `schema`."""
        return cls(features=list(model.features), sparse_cardinality={f: schema.sparse[f] for f in model.features},
                   hist_fields=list(model.hist_fields),
                   history_cardinality={f: schema.history[f] for f in model.hist_fields},
                   history_len=model.history_len if model.hist_fields else 0, dense=list(schema.dense),
                   tasks=list(model.tasks), kinds={t.name: t.kind for t in schema.tasks if t.name in model.tasks},
                   num_traffic=schema.num_traffic, summary_len=model.summary_len, summary_field=model.summary_field,
                   summary_cats=model.summary_cats)

    def to_json(self) -> str:
        return json.dumps({"format": SPEC_FORMAT, "version": SPEC_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> ServingSpec:
        """Parse a sidecar; `where` (its path) goes into the error of a foreign or newer one."""
        try:
            d = json.loads(text)
            if d.pop("format", None) != SPEC_FORMAT:
                raise ValueError(f"not a {SPEC_FORMAT} sidecar")
            if d.pop("version", None) != SPEC_VERSION:
                raise ValueError(f"version is not {SPEC_VERSION} (written by another recdistill version)")
            return cls(**d)
        except (ValueError, TypeError) as exc:
            raise ServeError(f"{where}: unusable serving spec: {exc}") from None


def spec_path(program_path: str | Path) -> Path:
    """Where the sidecar of a program lives: the same name with .json."""
    return Path(program_path).with_suffix(".json")


# ---- export ----------------------------------------------------------------------------------------------------
def example_inputs(spec: ServingSpec, device: torch.device, batch: int = EXAMPLE_BATCH) -> tuple:
    """Synthetic inputs to trace with, independent of any data: every dynamic size distinct and above 1.

    torch.export specialises a size of 0 or 1 to a constant, and its duck sizing ties together input sizes that
    happen to be equal; a real batch of single-id features (ids per row 1, ids per feature == batch size) hits
    both. Here feature i has batch + 1 + i ids (its first row holds 2 + i) and one row has no history.
    """
    g = torch.Generator().manual_seed(0)
    values, lengths = {}, {}
    for i, f in enumerate(spec.features):
        lengths[f] = torch.ones(batch, dtype=torch.int64)
        lengths[f][0] = 2 + i
        values[f] = torch.randint(0, spec.sparse_cardinality[f], (int(lengths[f].sum()),), generator=g)
    n = spec.history_len
    hist = {f: torch.randint(0, spec.history_cardinality[f], (batch, n), generator=g) for f in spec.hist_fields}
    keep = torch.arange(batch).unsqueeze(1) * max(n, 1) // batch  # row r keeps its last n - r*n/batch events
    mask = torch.arange(n).expand(batch, n) >= keep
    hist = {f: torch.where(mask, v, torch.zeros_like(v)) for f, v in hist.items()}
    dense = torch.randn(batch, len(spec.dense), generator=g)
    summary = torch.randint(0, 5, (batch, spec.summary_cats), generator=g).float()
    traffic = torch.randint(0, spec.num_traffic, (batch,), generator=g)
    return ({f: v.to(device) for f, v in values.items()}, {f: v.to(device) for f, v in lengths.items()},
            dense.to(device), {f: v.to(device) for f, v in hist.items()}, mask.to(device), summary.to(device),
            traffic.to(device))


def dynamic_shapes(spec: ServingSpec) -> tuple:
    """torch.export dynamic dimensions of the `serving_inputs` arguments: one batch size, ids per feature."""
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    # Dims are named by position: a feature's name need not be a Python identifier.
    ids = {f: torch.export.Dim(f"ids_{i}", min=0, max=1 << 30) for i, f in enumerate(spec.features)}
    return ({f: {0: ids[f]} for f in spec.features}, {f: {0: batch} for f in spec.features}, {0: batch},
            {f: {0: batch} for f in spec.hist_fields}, {0: batch}, {0: batch}, {0: batch})


def export_served(served: ServedStudent, spec: ServingSpec, path: str | Path) -> Path:
    """torch.export `served`, save it as `path` with suffix .pt2 and its spec beside it; returns the .pt2 path.

    A failed export is a ServeError carrying the cause: there is no fallback (a TorchScript trace would bake in
    the traced sizes and can silently mis-serve another batch).
    """
    device = next(served.parameters()).device
    try:
        program = torch.export.export(served, example_inputs(spec, device), dynamic_shapes=dynamic_shapes(spec),
                                      strict=False)
    except Exception as exc:  # noqa: BLE001 - any tracer error: re-raised with what was being exported
        raise ServeError(f"torch.export of the served student failed: {type(exc).__name__}: {exc}") from exc
    path = Path(path).with_suffix(".pt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    spec_path(path).write_text(spec.to_json())
    return path


# ---- loading and scoring ---------------------------------------------------------------------------------------
@dataclass
class LoadedStudent:
    """An exported student ready to run: the program's module, its spec and the device of its parameters."""

    module: torch.nn.Module
    spec: ServingSpec
    device: torch.device

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """[B, num_tasks] predictions for a batch whose dense columns are in `spec.dense` order."""
        return self.module(*serving_inputs(self.spec, batch.to(self.device)))


def load_served(path: str | Path) -> LoadedStudent:
    """Load `path` (.pt2) and its sidecar; ServeError naming the file when either is missing or unreadable."""
    path, side = Path(path), spec_path(path)
    for p in (path, side):
        if not p.is_file():
            raise ServeError(f"{p}: no such file (an exported student is <name>.pt2 with <name>.json beside it, "
                             "written by `recdistill student` with student.export=true)")
    spec = ServingSpec.from_json(side.read_text(), str(side))
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds for a file it cannot read
        raise ServeError(f"{path}: not a loadable torch.export program: {type(exc).__name__}: {exc}") from None
    tensors = [*program.state_dict.values(), *program.constants.values()]
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    return LoadedStudent(program.module(), spec, device)


def _where(source: DataSource) -> str:
    """The file (or source) to name in a data error: every file of a Parquet directory has the same columns."""
    files = getattr(source, "files", None)
    return files[0] if files else f"data source {type(source).__name__}"


def check_source(spec: ServingSpec, source: DataSource) -> list[int]:
    """DataError naming the feature and the file if `source` lacks something the model reads, or has more
    traffic sources than its correction covers; returns the positions of the model's dense features in the
    source's dense columns (they are matched by name, so a source may order or extend them differently)."""
    s, where = source.schema, _where(source)
    needs = [("sparse feature", f, f"sparse_{f}", s.sparse) for f in spec.features]
    needs += [("history field", f, f"hist_{f}", s.history) for f in spec.hist_fields]
    if spec.summary_len and spec.summary_field not in spec.hist_fields:  # summarised, not embedded
        needs.append(("history field", spec.summary_field, f"hist_{spec.summary_field}", s.history))
    needs += [("dense feature", f, f"dense_{f}", s.dense) for f in spec.dense]
    for role, name, column, have in needs:
        if name not in have:
            raise DataError(f"{where}: the model needs {role} '{name}' (column '{column}'), which the data lacks")
    if s.num_traffic > spec.num_traffic:
        raise DataError(f"{where}: the data has {s.num_traffic} traffic sources, the model's sampling correction "
                        f"covers {spec.num_traffic}")
    return [s.dense.index(d) for d in spec.dense]


def _check_ids(spec: ServingSpec, batch: Batch, where: str) -> None:
    """DataError for an id beyond the model's table (the program would fail with an index error)."""
    jts = batch.sparse.to_dict()
    pairs = [(f"sparse feature '{f}'", jts[f].values(), spec.sparse_cardinality[f]) for f in spec.features]
    pairs += [(f"history field '{f}'", batch.history.fields[f], spec.history_cardinality[f])
              for f in spec.hist_fields]
    if spec.summary_len:
        pairs.append((f"history field '{spec.summary_field}' (summarised)", batch.history.fields[spec.summary_field],
                      spec.summary_cats))
    for what, ids, card in pairs:
        if ids.numel() and int(ids.max()) >= card:
            raise DataError(f"{where}: {what} has id {int(ids.max())}, beyond the model's table of {card} rows")


def predict(model: str | Path | LoadedStudent, source: DataSource, days: list[int], out: str | Path, *,
            batch_size: int = 4096, show_progress: bool = True) -> dict:
    """Score every row of `days` of `source` with an exported student and write Parquet `out`: `sample_id`
    (int64) and `pred_<task>` (float32) per task. Written to a temporary name and renamed when complete.
    Returns {'rows', 'path'}."""
    served = model if isinstance(model, LoadedStudent) else load_served(model)
    spec, where = served.spec, _where(source)
    dense_cols = check_source(spec, source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    schema = pa.schema([("sample_id", pa.int64()), *((f"pred_{t}", pa.float32()) for t in spec.tasks)])
    total = sum(source.num_rows(d) for d in days)
    bar = progress(total=total, desc="predict", unit="row", enabled=show_progress)
    rows, buf = 0, []
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for batch in BatchLoader(source, days, batch_size, prefetch=2):
                _check_ids(spec, batch, where)
                preds = served(replace(batch, dense=batch.dense[:, dense_cols])).float().cpu().numpy()
                cols = [batch.sample_id.numpy(), *(preds[:, i] for i in range(len(spec.tasks)))]
                buf.append(pa.Table.from_arrays(cols, schema=schema))
                rows += len(batch)
                bar.update(len(batch))
                if sum(t.num_rows for t in buf) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(buf))
                    buf = []
            if buf:
                writer.write_table(pa.concat_tables(buf))
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written predictions under any name
        raise
    bar.close()
    os.replace(tmp, out)
    return {"rows": rows, "path": str(out)}
