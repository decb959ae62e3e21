"""Config loading: defaults, YAML, overrides, and every error path's message."""

from pathlib import Path

import pytest

from recdistill.cli import main as cli_main
from recdistill.config import Config, ConfigError, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_override_precedence(tmp_path):
    p = write(tmp_path, "data:\n  batch_size: 64\n  history_len: 100\n")
    cfg = load_config(p, ["data.batch_size=32", "sampling.student.q_eff=[0.5, 0.4, 0.3]"])
    assert cfg.data.batch_size == 32  # override beats file
    assert cfg.data.history_len == 100  # file beats default
    assert cfg.data.num_days == Config().data.num_days  # default
    assert cfg.sampling.student.q_eff == [0.5, 0.4, 0.3]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), Config)


def test_unknown_key_in_file_names_key_file_and_allowed(tmp_path):
    p = write(tmp_path, "data:\n  bach_size: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "data.bach_size" in msg and "batch_size" in msg and "history_len" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'; allowed here: data, experiment, sampling"):
        load_config(write(tmp_path, "trainer: {}\n"))


def test_bad_value_names_key_source_and_rule(tmp_path):
    p = write(tmp_path, "data:\n  history_len: 50000\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: data.history_len: Input should be less than or equal to 20000 (got 50000)" in str(e.value)


def test_bad_literal_from_override_lists_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=csv"])
    assert "--set data.source=csv: data.source: Input should be 'synthetic', 'parquet' or 'movielens'" in str(e.value)


def test_bad_nested_sampling_value():
    with pytest.raises(ConfigError, match=r"sampling.teacher.r: Input should be less than or equal to 1 \(got 1.5\)"):
        load_config(None, ["sampling.teacher.r=1.5"])
    with pytest.raises(ConfigError, match=r"q_eff\[1\]=1.2 must be in \(0, 1\]"):
        load_config(None, ["sampling.student.q_eff=[0.5, 1.2]"])


def test_bad_list_item_names_index():
    with pytest.raises(ConfigError, match=r"data.tasks.0.kind: Input should be 'binary' or 'continuous'"):
        load_config(None, ["data.tasks=[{name: ctr, kind: ordinal}]"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="eval_days=6 must be < num_days=6"):
        load_config(None, ["data.eval_days=6"])
    with pytest.raises(ConfigError, match="source=parquet needs data.path"):
        load_config(None, ["data.source=parquet"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("data.batch_size")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("data..batch_size=3")
    with pytest.raises(ConfigError, match="'data.batch_size' is a value, not a section"):
        load_config(None, ["data.batch_size=3", "data.batch_size.x=1"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.batch_size=17", "student.beta=auto"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg and again.digest() == cfg.digest()
    assert again.digest() != Config().digest()


def test_cli_config_error_exits_2_and_names_key(capsys):
    assert cli_main(["data", "export", "/tmp/never-written", "--set", "data.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'data.bogus'" in err and "--set data.bogus=1" in err


def test_overrides_and_yaml_merge_field_by_field(tmp_path):
    cfg = load_config(None, ["sampling.teacher.r=1.0"])
    assert (cfg.sampling.teacher.name, cfg.sampling.teacher.r, cfg.sampling.teacher.q) == ("teacher", 1.0, 1.0)
    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  student: {r: 0.2}\n")
    cfg = load_config(p, ["sampling.student={q: 0.5}"])
    assert (cfg.sampling.student.name, cfg.sampling.student.r, cfg.sampling.student.q) == ("student", 0.2, 0.5)


def test_teacher_digest_ignores_students_paths_and_logging():
    a = load_config(None, [])
    same = load_config(None, ["student.beta=7", "tracking.run_dir=/x", "teacher.checkpoint_dir=/c",
                              "teacher.log_every=3", "signals.uri=/s", "experiment.teacher_procs=4",
                              "teacher.checkpoint_keep=5", "data.count_cache=/cc", "data.count_scale=log"])
    assert same.teacher_digest() == a.teacher_digest() and same.digest() != a.digest()
    for change in ("teacher.lr=0.5", "sampling.teacher.r=0.9", "data.seed=3", "signals.window_steps=7",
                   "teacher.dense=bins", "data.counts=true", "teacher.signal_hidden=8"):
        assert load_config(None, [change]).teacher_digest() != a.teacher_digest(), change
    # fields added later count only once set: the default config has the teacher version it had before counting
    # features, dense bins and count caches existed (commit 6c09628); a change here orphans every saved checkpoint
    assert a.teacher_digest() == "8f0a679e272e"
    counted = load_config(None, ["data.counts=true"])
    assert load_config(None, ["data.counts=true", "data.count_cache=/cc"]).teacher_digest() == counted.teacher_digest()
    for change in ("data.count_scale=log", "data.count_window=3"):
        assert load_config(None, ["data.counts=true", change]).teacher_digest() != counted.teacher_digest(), change


def test_task_within_must_name_another_binary_task():
    ok = load_config(None, [])
    assert {t.name: t.within for t in ok.data.tasks} == {"ctr": None, "cvr": "ctr", "watch_time": "ctr"}
    tasks = '[{"name": "ctr"}, {"name": "wt", "kind": "continuous", "within": "nosuch"}]'
    with pytest.raises(ConfigError, match=r"task 'wt' has within='nosuch', which must name another binary task"):
        load_config(None, [f"data.tasks={tasks}"])
