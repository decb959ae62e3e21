"""Feature roles (issue 14): the same data under two namings gives the same models and predictions once the roles
say which column is which; a missing role is reported with what it costs, an error under data.roles.strict."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_CONFIG

from recdistill.cli import main
from recdistill.config import ConfigError, RolesConfig, load_config
from recdistill.data.batch import CONVENTIONAL_ROLES, Roles
from recdistill.data.parquet import DataError, ParquetSource, write_parquet
from recdistill.data.roles import report_roles, resolve_roles, roles_for
from recdistill.models.student import StudentModel
from recdistill.models.teacher import TeacherModel

# the user's own names for the world's user, item and category columns and the events' categories
RENAME = {"sparse_user_id": "sparse_user", "sparse_item_id": "sparse_item", "sparse_item_cat": "sparse_cat",
          "hist_cat": "hist_genre"}
ROLES = Roles(user="user", item="item", category="cat", hist_item="item", hist_category="genre", hist_action="action")
SETS = ["data.roles.user=user", "data.roles.item=item", "data.roles.category=cat", "data.roles.hist_category=genre"]
TINY = load_config(TINY_CONFIG).teacher


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Days 0-1 of a small synthetic world as Parquet (its roles recorded by write_parquet), and renamed copies."""
    from recdistill.data.world import SyntheticWorld

    root = tmp_path_factory.mktemp("roles")
    cfg = load_config(None, ["data.num_days=2", "data.samples_per_day=300", "data.history_len=32"])
    write_parquet(SyntheticWorld(cfg.data), str(root / "orig"), days=[0, 1], progress=False)
    rename(root / "orig", root / "declared", roles=ROLES)
    rename(root / "orig", root / "bare", roles=None)
    return root


def rename(src, dst, roles):
    """A copy of `src` with the RENAME columns renamed (and their cardinalities in the metadata), recording `roles`
    in the `recdistill.schema` metadata, or no roles when None."""
    for f in sorted(src.rglob("*.parquet")):
        table = pq.read_table(f)
        meta = dict(table.schema.metadata)
        schema = json.loads(meta[b"recdistill.schema"])
        for old, new in RENAME.items():
            part, o, n = ("sparse", old[7:], new[7:]) if old.startswith("sparse_") else ("history", old[5:], new[5:])
            schema[part] = {n if k == o else k: v for k, v in schema[part].items()}  # keeps the column order
        schema.pop("roles")
        if roles is not None:
            schema["roles"] = roles.as_dict()
        meta[b"recdistill.schema"] = json.dumps(schema).encode()
        table = table.rename_columns([RENAME.get(c, c) for c in table.column_names]).replace_schema_metadata(meta)
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)


def build(src: ParquetSource, roles: Roles) -> tuple[TeacherModel, StudentModel]:
    torch.manual_seed(0)
    teacher = TeacherModel(src.schema, TINY, roles).eval()
    torch.manual_seed(0)
    student = StudentModel(src.schema, history_len=16, roles=roles).eval()
    return teacher, student


@pytest.mark.parametrize("where", ["metadata", "config"])
def test_renamed_data_gives_the_same_models_and_predictions(exported, where):
    orig = ParquetSource(str(exported / "orig"))
    assert orig.roles == CONVENTIONAL_ROLES and set(orig.role_origin.values()) == {"declared"}  # written by export
    renamed = ParquetSource(str(exported / ("declared" if where == "metadata" else "bare")))
    cfg = load_config(None, SETS if where == "config" else []).data.roles
    roles = resolve_roles(cfg, renamed)
    assert roles == ROLES
    models_a, models_b = build(orig, resolve_roles(RolesConfig(), orig)), build(renamed, roles)
    batch_a, batch_b = orig.read(0, 0, 64), renamed.read(0, 0, 64)
    assert torch.equal(batch_a.sparse["item_id"].values(), batch_b.sparse["item"].values())
    for a, b in zip(models_a, models_b, strict=True):
        shapes_a = [tuple(v.shape) for v in a.state_dict().values()]
        assert shapes_a == [tuple(v.shape) for v in b.state_dict().values()]
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(va, vb), f"{ka} vs {kb}"  # same seed, same order of construction: same init
    with torch.no_grad():
        teacher_a, teacher_b = models_a[0](batch_a), models_b[0](batch_b)
        student_a, student_b = models_a[1](batch_a), models_b[1](batch_b)
    # Exact: the same weights meet the same inputs in the same order, only the names differ.
    for t in teacher_a:
        torch.testing.assert_close(teacher_a[t], teacher_b[t], rtol=0, atol=0, msg=f"teacher {t}")
        torch.testing.assert_close(student_a.main[t], student_b.main[t], rtol=0, atol=0, msg=f"student {t}")


def test_without_roles_the_renamed_data_loses_the_role_features(exported, capsys):
    """What the issue was about: the models quietly dropped the candidate queries; now it shows and is said."""
    renamed = ParquetSource(str(exported / "bare"))
    assert renamed.roles == Roles(hist_item="item", hist_action="action")  # only the conventional names it has
    assert renamed.role_origin["item"] == "missing" and renamed.role_origin["hist_item"] == "default"
    roles = roles_for(RolesConfig(), renamed, "teacher")
    err = capsys.readouterr().err
    assert ("warning: data.roles.item is not set and the data has no 'item_id' sparse feature: the teacher loses its "
            "candidate-item LONGER query; set data.roles.item=<sparse feature> (sparse features: ") in err
    assert "'item'" in err and "'cat'" in err  # the features the user can choose from
    assert "the teacher loses its candidate-category LONGER query and the target-match statistics" in err
    assert "data.roles.hist_category is not set and the data has no 'cat' history field" in err
    assert "data.roles.user is not set" in err and "hist_action" not in err
    teacher, student = build(renamed, roles)
    assert teacher.dense.n_global == 2 and teacher.dense.match_proj is None  # CLS + dense context only
    assert student.target_feature is None and student.match_cat is None
    roles_for(RolesConfig(), renamed, "student")
    assert "the student loses its target attention" in capsys.readouterr().err


def test_strict_turns_the_warning_into_an_error(exported, capsys):
    renamed = ParquetSource(str(exported / "bare"))
    strict = RolesConfig(strict=True)
    with pytest.raises(ConfigError, match="data.roles.strict is set") as exc:
        roles_for(strict, renamed, "teacher")
    assert "data.roles.item is not set and the data has no 'item_id' sparse feature" in str(exc.value)
    assert capsys.readouterr().err == ""
    # strict with every role it lacks set: fine, and nothing to say
    roles = roles_for(load_config(None, [*SETS, "data.roles.strict=true"]).data.roles, renamed, "student")
    assert roles == ROLES and capsys.readouterr().err == ""


def test_a_role_naming_what_the_data_lacks_is_an_error_naming_key_value_and_choices(exported, tmp_path):
    renamed = ParquetSource(str(exported / "bare"))
    with pytest.raises(ConfigError, match=r"data.roles.item='item_id': the data has no sparse feature 'item_id' "
                                          r"\(column 'sparse_item_id'\); its sparse features: \[.*'item'"):
        resolve_roles(RolesConfig(item="item_id"), renamed)
    with pytest.raises(ConfigError, match=r"data.roles.hist_category='cat': the data has no history field 'cat'.*"
                                          r"'genre'"):
        resolve_roles(RolesConfig(hist_category="cat"), renamed)
    # the same check on roles declared in the metadata: a DataError naming the file
    rename(exported / "orig", tmp_path / "bad", roles=Roles(item="item_id", hist_item="item"))
    with pytest.raises(DataError, match=r"part-00000.parquet: metadata 'recdistill.schema' declares role "
                                        r"item='item_id' but there is no column 'sparse_item_id'"):
        ParquetSource(str(tmp_path / "bad"))


def test_the_teacher_cannot_do_without_history_items(exported):
    src = ParquetSource(str(exported / "orig"))
    roles = Roles(item="item_id")  # e.g. a source that declares no history roles
    with pytest.raises(ConfigError, match="data.roles.hist_item is not set .* the teacher needs it"):
        report_roles(roles, RolesConfig(), src.schema, "teacher")


def test_sources_declare_their_roles():
    from recdistill.data.world import SyntheticWorld

    world = SyntheticWorld(load_config(None, ["data.samples_per_day=10"]).data)
    assert resolve_roles(RolesConfig(), world) == CONVENTIONAL_ROLES
    assert resolve_roles(RolesConfig(category="user_segment", hist_action=None), world).category == "user_segment"


def test_inspect_and_teacher_dry_run_show_the_roles(exported, capsys):
    assert main(["data", "inspect", str(exported / "declared")]) == 0
    out = capsys.readouterr().out
    assert "  item: item (declared in metadata)" in out and "  hist_category: genre (declared in metadata)" in out
    assert main(["data", "inspect", str(exported / "bare")]) == 0
    out = capsys.readouterr().out
    assert "  item: missing" in out and "  hist_item: item (default: the conventional name)" in out
    dry = ["teacher", "--dry-run", "--json", "--config", TINY_CONFIG, "--world-size", "2",
           "--set", "data.source=parquet", "--set", f"data.path={exported / 'bare'}"]
    assert main(dry) == 0
    captured = capsys.readouterr()
    # the last line: DeepSpeed's import may print a line of its own to stdout first
    assert json.loads(captured.out.splitlines()[-1])["roles"] == Roles(hist_item="item", hist_action="action").as_dict()
    assert "warning: data.roles.item is not set" in captured.err
    assert main([*dry, "--set", "data.roles.strict=true"]) == 2
    assert "data.roles.strict is set and a role is missing" in capsys.readouterr().err
    assert main([*dry, *[a for s in SETS for a in ("--set", s)]]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["roles"] == ROLES.as_dict() and "warning" not in captured.err


def test_trainers_build_their_models_with_the_resolved_roles(exported, tmp_path, capsys):
    """The student trainer reports and uses the roles; the teacher trainer refuses under strict before building
    anything (the full teacher run with roles wired in: tests/train/test_teacher_trainer.py)."""
    from recdistill.train.distributed import DistInfo
    from recdistill.train.student import StudentTrainer
    from recdistill.train.teacher import TeacherTrainer

    data = ["data.source=parquet", f"data.path={exported / 'bare'}", "student.towers=single",
            "student.tower_loss=task", "student.export=false", "tracking.mode=disabled"]
    trainer = StudentTrainer(load_config(None, data), run_dir=tmp_path / "s")
    assert trainer.model.target_feature is None and "the student loses its target attention" in capsys.readouterr().err
    trainer = StudentTrainer(load_config(None, data + SETS), run_dir=tmp_path / "s")
    assert (trainer.model.target_feature, trainer.model.match_cat) == ("item", "cat")
    assert trainer.model.hist_fields == ("item", "genre", "action")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="the teacher loses its candidate-item LONGER query"):
        TeacherTrainer(load_config(TINY_CONFIG, [*data, "data.roles.strict=true"]), info)
