"""Signal-store records, metadata and layout (DESIGN §4 'Signal store').

Record: sample_id int64, logits fixed_size_list<float32>[num_tasks] (raw, pre-debias; one list column rather
than a column per task, so the record layout does not depend on task names, which live in the metadata),
teacher_step int64. Every shard carries SignalMeta as JSON under the Arrow schema metadata key
`recdistill.signals`. Layout under any fsspec URI (window and rank numbers in plain decimal, not padded):

    {uri}/window=W/rank=R.arrow              Arrow IPC file, one per (window, rank)
    {uri}/_commits/window=W.rank=R.json      written last; the shard exists for readers only once this exists:
                                             rows, checksum of the shard bytes, step range, SignalMeta

Compacted (materialized) form: {uri}/window=W/part-<crc32>.parquet plus {uri}/_manifest.json (written last).
Checksums are "crc32:<8 hex>" of the file bytes: they catch truncation and bit rot at 2+ GB/s, about twice
the speed of sha256 here, which matters because the writer computes one per window beside the trainer.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from recdistill.config import SamplingConfig
from recdistill.errors import RecdistillError

SCHEMA_VERSION = 1
META_KEY = b"recdistill.signals"
COMMITS = "_commits"
MANIFEST = "_manifest.json"
_COMMIT_RE = re.compile(r"window=(\d+)\.rank=(\d+)\.json$")
_SHARD_RE = re.compile(r"window=(\d+)/rank=(\d+)\.arrow$")


class SignalError(RecdistillError, RuntimeError):
    """A signal shard or store is unusable or incompatible; the message names the shard and the problem."""

    fix = "`recdistill signals verify URI` lists every problem of a store"


class SignalMeta(BaseModel):
    """What every shard records about the teacher that wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(description="Teacher run id.")
    teacher_version: str = Field(description="Config hash of the teacher (a reader can require it).")
    tasks: list[str] = Field(description="Task names, the order of the logits columns.")
    sampling: SamplingConfig = Field(description="The teacher's sampling view (its logits live in that space).")
    schema_version: int = Field(SCHEMA_VERSION, description="Record layout version.")


def arrow_schema(meta: SignalMeta) -> pa.Schema:
    """The Arrow schema of a shard, with the metadata attached."""
    return pa.schema([("sample_id", pa.int64()), ("logits", pa.list_(pa.float32(), len(meta.tasks))),
                      ("teacher_step", pa.int64())], metadata={META_KEY: meta.model_dump_json().encode()})


def hidden_uri(uri: str) -> str:
    """Where the teacher's representations go beside the logits store at `uri` (teacher.signal_hidden): a store of
    the same layout whose "tasks" are the dimensions h0, h1, ...; a sibling, not a child, so that neither store's
    listing sees the other's files."""
    return f"{uri.rstrip('/')}.hidden"


def hidden_names(dim: int) -> list[str]:
    """The column names of a representation store of `dim` dimensions."""
    return [f"h{i}" for i in range(dim)]


def shard_path(uri: str, window: int, rank: int) -> str:
    """Where the shard of (window, rank) lives."""
    return f"{uri.rstrip('/')}/window={window}/rank={rank}.arrow"


def commit_path(uri: str, window: int, rank: int) -> str:
    """Where the commit marker of (window, rank) lives."""
    return f"{uri.rstrip('/')}/{COMMITS}/window={window}.rank={rank}.json"


def parse_commit_name(path: str) -> tuple[int, int] | None:
    m = _COMMIT_RE.search(path)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_shard_name(path: str) -> tuple[int, int] | None:
    m = _SHARD_RE.search(path)
    return (int(m.group(1)), int(m.group(2))) if m else None


def checksum(data: bytes | memoryview) -> str:
    """Checksum of a file's bytes, self-describing ("crc32:0badf00d")."""
    return f"crc32:{zlib.crc32(data):08x}"


def checksum_matches(data: bytes, expected: str) -> bool:
    """Whether `data` has checksum `expected` (an unknown algorithm never matches)."""
    return expected.startswith("crc32:") and checksum(data) == expected


def list_commits(fs, root: str, skip: set | None = None) -> dict[tuple[int, int], Commit]:  # noqa: ANN001
    """(window, rank) -> Commit for every commit marker under `root` (markers in `skip` are not read)."""
    d = f"{root}/{COMMITS}"
    names = fs.ls(d, detail=False) if fs.exists(d) else []
    out = {}
    for name in sorted(names):
        parsed = parse_commit_name(name)
        if parsed is not None and (skip is None or parsed not in skip):
            out[parsed] = Commit.from_json(fs.cat_file(name).decode(), name)
    return out


def read_manifest(fs, root: str) -> dict | None:  # noqa: ANN001
    """The manifest of a compacted store, or None for a live store."""
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        return None
    try:
        manifest = json.loads(fs.cat_file(path))
        manifest["meta"] = SignalMeta.model_validate(manifest["meta"])
        return manifest
    except Exception as exc:  # noqa: BLE001 - any malformed manifest is reported the same way
        raise SignalError(f"{path}: unreadable manifest: {exc}") from None


@dataclass(frozen=True)
class Commit:
    """A commit marker: the shard it vouches for and what it must contain."""

    window: int
    rank: int
    rows: int
    checksum: str
    nbytes: int
    step_min: int
    step_max: int
    meta: SignalMeta

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in ("window", "rank", "rows", "checksum", "nbytes", "step_min", "step_max")}
        return json.dumps({**d, "meta": json.loads(self.meta.model_dump_json())})

    @staticmethod
    def from_json(text: str, path: str) -> Commit:
        try:
            d = json.loads(text)
            return Commit(meta=SignalMeta.model_validate(d.pop("meta")), **d)
        except Exception as exc:  # noqa: BLE001 - any malformed marker is reported the same way
            raise SignalError(f"{path}: unreadable commit marker: {exc}") from None


def check_compatible(meta: SignalMeta, where: str, *, tasks: list[str] | None = None,
                     teacher_version: str | None = None, reference: SignalMeta | None = None) -> None:
    """Refuse a shard whose schema version, tasks or teacher version differ from what is expected."""
    if meta.schema_version != SCHEMA_VERSION:
        raise SignalError(f"{where}: schema version {meta.schema_version}, this reader understands {SCHEMA_VERSION}")
    want_tasks = tasks if tasks is not None else (reference.tasks if reference else None)
    if want_tasks is not None and meta.tasks != list(want_tasks):
        raise SignalError(f"{where}: tasks {meta.tasks} differ from the expected {list(want_tasks)}")
    want_version = teacher_version if teacher_version is not None else (
        reference.teacher_version if reference else None)
    if want_version is not None and meta.teacher_version != want_version:
        raise SignalError(f"{where}: teacher version '{meta.teacher_version}' differs from the expected "
                          f"'{want_version}'")
