"""The Optuna study in a database server (``[search] study_storage``, tuning/studies.py), against a
real PostgreSQL server (the session's ``postgres`` fixture): the search's searcher keeps its study
there under a name of its own, no password is recorded or printed, a resumed search gets the
password from the environment, and bad input is one line before anything runs. None trains."""
from __future__ import annotations

import json
import os
import pickle

import optuna
import pytest

from conftest import prunetune_here, tiny_spec
from servers import free_port
from test_bad_input import experiment, one_clear_line
from trainables.errors import StudyError
from tuning import driver, space, studies
from tuning.names import SPEC_FILE, STUDY_FILE
from tuning.spec import from_dict, replace


def searcher_of(spec, exp_dir):
    """The searcher a new search gets (tuning.space.sampling, as the driver calls it)."""
    exp_dir.mkdir(parents=True)
    return space.sampling(spec, exp_dir).searcher


def tell(searcher, trial_id: str, accuracy: float, latency_ms: float) -> dict:
    """One trial asked of the searcher and told back as a finished trial reports it."""
    config = searcher.suggest(trial_id)
    searcher.on_trial_complete(trial_id, {"phase": "done", "accuracy": accuracy, "latency_ms": latency_ms, **config})
    return config


@pytest.fixture
def no_study_env(monkeypatch, tmp_path):
    """No password anywhere libpq or prunetune would look (``~/.pgpass`` neither)."""
    for name in (studies.ENV, "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


# ------------------------------------------------------------------- the study in the database

def test_the_searchers_study_lives_in_the_database_and_end_study_reads_it(postgres, tmp_path, no_study_env):
    spec = from_dict(tiny_spec(tmp_path, study_storage=postgres.url()))
    exp_dir = tmp_path / "rr" / "tiny-20260101-000000-aaaaaa"
    searcher = searcher_of(spec, exp_dir)
    told = [tell(searcher, "t1", 0.7, 2.0), tell(searcher, "t2", 0.8, 3.0)]
    assert not (exp_dir / STUDY_FILE).exists()  # nothing in the experiment directory
    # in the database, under the experiment directory's name, read by another client
    study = optuna.load_study(study_name=exp_dir.name, storage=postgres.url())
    assert [t.values for t in study.trials] == [[0.7, 2.0], [0.8, 3.0]]
    assert [t.params["lr"] for t in study.trials] == [c["lr"] for c in told]
    ended = space.end_study(spec, exp_dir)
    assert ended.study_name == exp_dir.name and len(ended.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 2
    # a trial asked by a driver that died before it was told is FAILed by end_study
    searcher.suggest("t3")
    assert [t.state for t in space.end_study(spec, exp_dir).trials][-1] == optuna.trial.TrialState.FAIL


def test_two_searches_of_one_spec_keep_a_study_each(postgres, tmp_path, no_study_env):
    spec = from_dict({**tiny_spec(tmp_path, study_storage=postgres.url()), "name": "twins"})
    first, second = tmp_path / "rr" / "twins-1", tmp_path / "rr" / "twins-2"
    a, b = searcher_of(spec, first), searcher_of(spec, second)
    tell(a, "t1", 0.5, 1.0)
    for i in range(3):
        tell(b, f"t{i}", 0.6, 1.0)
    assert len(space.end_study(spec, first).trials) == 1 and len(space.end_study(spec, second).trials) == 3
    names = optuna.get_all_study_names(postgres.url())
    assert {"twins-1", "twins-2"} <= set(names) and "twins" not in names


def test_the_sqlite_study_keeps_its_file_and_the_specs_name(tmp_path, no_study_env):
    spec = from_dict(tiny_spec(tmp_path))
    assert spec.search.study_storage == ""
    exp_dir = tmp_path / "rr" / "tiny-1"
    tell(searcher_of(spec, exp_dir), "t1", 0.5, 1.0)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp_dir / STUDY_FILE}")
    assert len(study.trials) == 1 and space.end_study(spec, exp_dir).study_name == "tiny"


# ------------------------------------------------------------------- the password

def test_study_storage_defaults_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(studies.ENV, "postgresql://optuna:pw@db:5432/optuna")
    assert from_dict({}).search.study_storage == "postgresql://optuna:pw@db:5432/optuna"
    monkeypatch.delenv(studies.ENV)
    assert from_dict({}).search.study_storage == ""
    # a relative SQLite path is made absolute once (resume may run elsewhere)
    monkeypatch.chdir(tmp_path)
    relative = from_dict({"search": {"study_storage": "sqlite:///s.db"}})
    assert relative.search.study_storage == f"sqlite:///{tmp_path}/s.db"


def test_no_record_of_the_spec_holds_the_password(postgres, tmp_path, no_study_env):
    """The spec file the driver writes, the parent run's params and experiment.json (the tracking
    callback's own writing), the trials' record, and the searcher as Tune pickles it into the
    experiment directory: each names the database, none its password."""
    from mlflow import MlflowClient

    from tuning import tracking
    from tuning.names import EXPERIMENT_JSON

    spec = from_dict(tiny_spec(tmp_path, study_storage=postgres.url()))
    public = postgres.url(password="")
    recorded = json.dumps(spec.to_dict())  # what driver.search writes to prunetune_spec.json, and hands on
    assert postgres.password not in recorded and json.loads(recorded)["search"]["study_storage"] == public
    assert spec.search.study_storage == postgres.url()  # in memory, the search still has it
    assert replace(spec, {"train.epochs": 2}, "test").search.study_storage == postgres.url()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.MlflowTracking(uri, spec.to_dict(), tmp_path / "rr" / "tiny-1")
    client = MlflowClient(uri)
    run = client.get_run(tracker.parent_id)
    assert run.data.params["search.study_storage"] == public
    logged = client.download_artifacts(tracker.parent_id, EXPERIMENT_JSON, str(tmp_path))
    assert postgres.password not in open(logged).read() and public in open(logged).read()
    assert postgres.password not in json.dumps([run.data.params, run.data.tags])

    searcher = searcher_of(spec, tmp_path / "rr" / "tiny-2")
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune writes into the experiment directory
    assert postgres.password.encode() not in (tmp_path / "searcher.pkl").read_bytes()


def test_a_resumed_search_takes_the_password_from_the_environment(postgres, tmp_path, monkeypatch, no_study_env):
    spec = from_dict(tiny_spec(tmp_path, study_storage=postgres.url()))
    exp_dir = tmp_path / "rr" / "tiny-20260101-000000-bbbbbb"
    searcher = searcher_of(spec, exp_dir)
    tell(searcher, "t1", 0.7, 2.0)
    (exp_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict()))  # as driver.search records it
    searcher.save(str(exp_dir / "searcher-state.pkl"))  # as Tune saves the searcher

    # the recorded URL alone (no PGPASSWORD, no ~/.pgpass): the study cannot be reached
    _, resumed, _ = driver._open_experiment_dir(exp_dir)
    assert resumed.search.study_storage == postgres.url(password="")
    with pytest.raises(StudyError, match="password"):
        studies.check(resumed)
    # PRUNETUNE_STUDY_STORAGE naming the same database gives the password; the study is the search's own
    monkeypatch.setenv(studies.ENV, postgres.url())
    _, resumed, _ = driver._open_experiment_dir(exp_dir)
    studies.check(resumed)
    assert len(space.end_study(resumed, exp_dir).trials) == 1
    # ... and the searcher Tune restores from its pickle reaches the study with it
    state = pickle.loads((exp_dir / "searcher-state.pkl").read_bytes())
    assert len(state["study"].trials) == 1
    # naming another database it gives nothing; libpq's PGPASSWORD does
    monkeypatch.setenv(studies.ENV, postgres.url().replace("/optuna", "/elsewhere"))
    _, resumed, _ = driver._open_experiment_dir(exp_dir)
    assert resumed.search.study_storage == postgres.url(password="")
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    studies.check(resumed)
    assert len(space.end_study(resumed, exp_dir).trials) == 1


def test_a_spec_recorded_before_study_storage_resumes_with_its_sqlite_file(tmp_path, monkeypatch):
    exp_dir = tmp_path / "old-1"
    exp_dir.mkdir()
    recorded = from_dict({"name": "old"}).to_dict()
    del recorded["search"]["study_storage"]
    (exp_dir / SPEC_FILE).write_text(json.dumps(recorded))
    monkeypatch.setenv(studies.ENV, "postgresql://optuna:pw@db:5432/optuna")  # set since: not this search's study
    assert driver._open_experiment_dir(exp_dir)[1].search.study_storage == ""


# ------------------------------------------------------------------- bad input: one line, before anything runs

def search_with(tmp_path, *overrides: str, env: dict | None = None):
    """``prunetune search`` of a small experiment with ``--set`` overrides; asserts that it lost before
    anything was created (the MLflow store, the results directory)."""
    args = [a for o in overrides for a in ("--set", o)]
    r = prunetune_here("search", str(experiment(tmp_path)), *args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                       env=env)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "rr").exists()
    return r


def test_an_unreachable_study_database(tmp_path, no_study_env):
    port = free_port()  # nothing listens there
    r = search_with(tmp_path, f"search.study_storage=postgresql://optuna:hunter22@127.0.0.1:{port}/optuna")
    one_clear_line(r, 2, f"the Optuna study's database postgresql://optuna@127.0.0.1:{port}/optuna cannot be used",
                   "Connection refused", "start it or fix the URL and its password")
    assert "hunter22" not in r.stdout + r.stderr


def test_a_wrong_study_database_password(postgres, tmp_path, no_study_env):
    r = search_with(tmp_path, f"search.study_storage={postgres.url(password='wrong-one-42')}")
    one_clear_line(r, 2, f"the Optuna study's database {postgres.url(password='')} cannot be used",
                   'password authentication failed for user "optuna"', studies.ENV, "PGPASSWORD")
    assert "wrong-one-42" not in r.stdout + r.stderr


def test_a_wrong_password_from_the_environment_stops_a_resume(postgres, tmp_path, monkeypatch, no_study_env):
    exp_dir = tmp_path / "rr" / "tiny-1"
    exp_dir.mkdir(parents=True)
    (exp_dir / SPEC_FILE).write_text(json.dumps(from_dict(tiny_spec(tmp_path, study_storage=postgres.url())).to_dict()))
    monkeypatch.setenv(studies.ENV, postgres.url(password="not-it-77"))
    r = prunetune_here("resume", str(exp_dir))
    one_clear_line(r, 2, f"the Optuna study's database {postgres.url(password='')} cannot be used",
                   "password authentication failed")
    assert "not-it-77" not in r.stdout + r.stderr


@pytest.mark.parametrize("url, message", [
    ("redis://optuna:hunter22@db:6379/0", "Optuna keeps studies in postgresql, mysql, sqlite databases, not 'redis'"),
    ("optuna at the db server", "'optuna at the db server' is not a database URL"),
])
def test_a_study_storage_optuna_cannot_use(tmp_path, no_study_env, url, message):
    r = search_with(tmp_path, f"search.study_storage={url}")
    one_clear_line(r, 2, "[search] study_storage", message, 'study_storage = "postgresql://', studies.ENV)
    assert "hunter22" not in r.stdout + r.stderr


def test_a_study_storage_from_the_environment_is_named_as_such(tmp_path, no_study_env):
    r = search_with(tmp_path, env={**os.environ, studies.ENV: "mongodb://db/optuna"})
    one_clear_line(r, 2, f"${studies.ENV} ([search] study_storage's default)", "not 'mongodb'")


@pytest.mark.parametrize("study_storage", ["", "sqlite:////shared/optuna.db"])
def test_an_object_store_needs_a_study_database(tmp_path, no_study_env, study_storage):
    r = search_with(tmp_path, "search.storage_path=s3://bucket/prefix",
                    f"search.study_storage={study_storage}")
    one_clear_line(r, 2, "[search] storage_path 's3://bucket/prefix' is an object store",
                   "give the study a database server", '[search] study_storage = "postgresql://', studies.ENV)
    # with a database the check passes (and a grid search has no study to keep)
    from_dict({"search": {"storage_path": "s3://bucket/prefix", "study_storage": "postgresql://optuna@db/optuna"}})
    from_dict({"search": {"storage_path": "s3://bucket/prefix", "sampler": "grid", "grid_lrs": [0.01]}})
