"""MLflow with its basic authentication (what docker/compose.yaml runs), a real server: anonymous
requests are refused, and prunetune says which environment variables it needs before anything
is trained. A whole search with credentials against the same server: tests/test_load.py."""
import urllib.error
import urllib.request

import pytest

from conftest import prunetune_here

pytestmark = pytest.mark.slow  # an MLflow server process


def test_anonymous_request_is_refused(auth_mlflow):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{auth_mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert e.value.code == 401
    assert urllib.request.urlopen(f"{auth_mlflow.url}/health", timeout=30).status == 200  # what compose probes


def test_credentials_are_accepted(auth_mlflow):
    import os

    from tuning import runs

    saved = dict(os.environ)
    try:
        os.environ.update(auth_mlflow.credentials)
        runs.check_reachable(auth_mlflow.url).search_experiments(max_results=1)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("given, message", [
    ({}, "requires authentication (401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "not-the-password"},
     "refused the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (401)"),
])
def test_search_without_valid_credentials_stops_before_training(auth_mlflow, tmp_path, given, message):
    import os

    spec_file = tmp_path / "s.toml"
    spec_file.write_text(f'[data]\ntrain_size = 60\n[search]\nstorage_path = "{tmp_path}/rr"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    r = prunetune_here("search", str(spec_file), "--tracking-uri", auth_mlflow.url, env={**env, **given})
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "rr").exists()  # nothing created, nothing trained
    assert "not-the-password" not in r.stderr + r.stdout
