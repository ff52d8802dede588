"""docker/: no Docker engine runs here, so check that the compose file, the cluster launcher
config and the Dockerfile agree with the package: the commands they run exist with the flags
they pass, ports and environment variables are the ones the CLI uses, volumes and
credentials line up, and README's cluster section names what is there."""
import configparser
import importlib.metadata
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tuning import cli, jobs

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


@lru_cache
def help_flags(*command: str) -> set[str]:
    out = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def mlflow_server_envvars() -> dict[str, str]:
    """The environment variables ``mlflow server`` reads for its options: variable -> flag."""
    import mlflow.cli

    return {p.envvar: p.opts[0] for p in mlflow.cli.server.params if isinstance(p.envvar, str)}


def flags(argv: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` / ``--switch`` -> {"--key": "value", "--switch": None}."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key, eq, value = a.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            out[key] = value if (eq or value) else None
        i += 1
    return out


def check_command(argv: list[str]) -> dict[str, str | None]:
    """The program is installed by the package and knows every flag passed to it."""
    if argv[0] == "ray":
        assert argv[1] == "start", argv
        known = help_flags("ray", "start")
    elif argv[0] == "mlflow":
        assert argv[1] == "server", argv
        known = help_flags("mlflow", "server")
    else:
        raise AssertionError(f"unexpected program {argv[0]!r}")
    f = flags(argv[2:])
    assert set(f) <= known, f"unknown flags for {argv[:2]}: {set(f) - known}"
    return f


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_compose_services_and_commands(compose):
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres"} <= set(services)
    head = check_command(shlex.split(services["ray-head"]["command"]))
    worker = check_command(shlex.split(services["ray-worker"]["command"]))
    server = check_command(shlex.split(services["mlflow"]["command"]))
    assert "--head" in head and "--block" in head and "--block" in worker
    # workers join the head service at the head's GCS port
    assert worker["--address"] == f"ray-head:{head['--port']}"
    # the Jobs API port is the one `prunetune submit` defaults to; Ray Client's is the one README uses
    assert int(head["--dashboard-port"]) == port_of(jobs.DEFAULT_JOBS_ADDRESS)
    assert head["--dashboard-host"] == "0.0.0.0"
    published = {p.split(":")[0] for s in services.values() for p in s.get("ports", [])}
    assert {head["--dashboard-port"], head["--ray-client-server-port"], server["--port"]} <= published
    # MLflow: the port the other services use and `prunetune ui` defaults to; reachable by service name
    env = services["ray-head"]["environment"]
    assert port_of(env["MLFLOW_TRACKING_URI"]) == int(server["--port"]) == cli._parser().parse_args(["ui"]).port
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")
    # the Host headers MLflow answers come from a variable `mlflow server` reads for --allowed-hosts, with a
    # default for compose's own network and one the cluster launcher's users extend with the head's address
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert mlflow_server_envvars()["MLFLOW_SERVER_ALLOWED_HOSTS"] == "--allowed-hosts" and "--allowed-hosts" not in server
    variable, default = re.fullmatch(r"\$\{(\w+):-(.+)\}", allowed).groups()
    assert "mlflow:5000" in default.split(",") and "localhost:5000" in default.split(",")
    assert f"export {variable}=" in (DOCKER / "ray-cluster.yaml").read_text() and "HEAD_IP:5000" in (
        DOCKER / "ray-cluster.yaml").read_text()


def test_compose_postgres_backend_and_healthchecks(compose):
    services = compose["services"]
    server = flags(shlex.split(services["mlflow"]["command"])[2:])
    # the backend store from the environment (`mlflow server` reads MLFLOW_BACKEND_STORE_URI), its
    # password the same host variable PostgreSQL is started with, never written here
    assert "--backend-store-uri" not in server
    store = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    m = re.fullmatch(r"postgresql://(\w+):(\$\{[^}]+\})@postgres:5432/(\w+)", store)
    assert m, store
    pg = services["postgres"]["environment"]
    assert m.groups() == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert required_from_env(pg["POSTGRES_PASSWORD"]) == "POSTGRES_PASSWORD"
    assert mlflow_server_envvars()["MLFLOW_BACKEND_STORE_URI"] == "--backend-store-uri"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # artifacts on a volume of their own by default, where --artifacts-destination points (`mlflow server` reads
    # it from a variable a user sets to s3://... for an object store); the store's credentials pass through
    # from the environment of `docker compose`, never written in the file
    env = services["mlflow"]["environment"]
    variable, default = re.fullmatch(r"\$\{(\w+):-(.+)\}", env["MLFLOW_ARTIFACTS_DESTINATION"]).groups()
    assert mlflow_server_envvars()[variable] == "--artifacts-destination" and "--artifacts-destination" not in server
    assert any(v.endswith(":" + default) for v in services["mlflow"]["volumes"])
    assert all(env[k] is None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"))
    # the image talks to PostgreSQL (MLflow's store, the Optuna study) with the driver SQLAlchemy takes for
    # postgresql:// (psycopg 3 since SQLAlchemy 2.1), pinned with its binary build
    from sqlalchemy.engine import make_url

    driver = make_url("postgresql://").get_dialect().driver
    assert importlib.util.find_spec(driver) is not None
    for name in (driver, f"{driver}-binary"):
        assert re.search(rf"^{name}==", (DOCKER / "requirements.txt").read_text(), re.M), name


def test_compose_shared_storage_gpus_and_auth(compose):
    services = compose["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    storage = head["environment"]["PRUNETUNE_STORAGE_PATH"]
    assert worker["environment"]["PRUNETUNE_STORAGE_PATH"] == storage
    # the same named volume at storage_path on the head and on every worker
    mounts = [{v for v in s["volumes"] if v.endswith(":" + storage)} for s in (head, worker)]
    assert mounts[0] and mounts[0] == mounts[1] and mounts[0].pop().split(":")[0] in compose["volumes"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for s in (head, worker):
        assert s["environment"]["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in s["environment"]
    # the environment variables are the ones the package reads
    source = "".join(p.read_text() for p in (REPO / "tuning").glob("*.py"))
    for name in ("MLFLOW_TRACKING_URI", "PRUNETUNE_STORAGE_PATH", "PRUNETUNE_STUDY_STORAGE", "RAY_ADDRESS"):
        assert f'"{name}"' in source, name


def test_compose_study_database(compose):
    """The Optuna study: on the head and every worker PRUNETUNE_STUDY_STORAGE points at the compose
    postgres service, with a role and database of its own (not MLflow's), its password a required
    variable of the host's environment that the postgres service gets too, for the init script it
    mounts where postgres runs such scripts."""
    from tuning import studies

    services = compose["services"]
    head, worker, pg = services["ray-head"], services["ray-worker"], services["postgres"]
    url = head["environment"][studies.ENV]
    assert worker["environment"][studies.ENV] == url
    m = re.fullmatch(r"postgresql://(\w+):(\$\{[^}]+\})@postgres:5432/(\w+)", url)
    assert m, url
    user, password, database = m.groups()
    assert user != pg["environment"]["POSTGRES_USER"] and database != pg["environment"]["POSTGRES_DB"]
    assert required_from_env(password) == "OPTUNA_DB_PASSWORD"
    assert required_from_env(pg["environment"]["OPTUNA_DB_PASSWORD"]) == "OPTUNA_DB_PASSWORD"
    assert studies.problem(url.replace(password, "secret")) is None
    assert "export POSTGRES_PASSWORD=$(openssl rand -hex 16) OPTUNA_DB_PASSWORD=$(openssl rand -hex 16)" in (
        DOCKER / "compose.yaml").read_text()
    (script,) = [v.split(":")[0] for v in pg["volumes"] if v.split(":")[1].startswith("/docker-entrypoint-initdb.d/")]
    assert (DOCKER / script).is_file() and script.endswith(".sh")


def test_postgres_init_script_creates_the_study_role_and_database(compose, tmp_path):
    """docker/postgres-init.sh run for real as postgres's entrypoint runs it (psql as POSTGRES_USER on
    the socket, the service's environment), on a server standing for the compose one: the role and
    database of PRUNETUNE_STUDY_STORAGE, reachable over TCP with the password from the environment
    only, kept out of MLflow's database; run again, it sets the new password."""
    import shutil

    import psycopg

    from conftest import need_postgres
    from servers import PostgresServer
    from tuning import studies

    need_postgres()
    pg = compose["services"]["postgres"]
    url = compose["services"]["ray-head"]["environment"][studies.ENV]
    user, database = re.fullmatch(r"postgresql://(\w+):\$\{[^}]+\}@postgres:5432/(\w+)", url).groups()
    (script,) = [v.split(":")[0] for v in pg["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    server = PostgresServer(user=pg["environment"]["POSTGRES_USER"]).start()  # MLflow's role and database
    try:
        psql = shutil.which("psql") or str(server.bin / "psql")
        for password in ("first-password-1", "second-password-2"):
            env = {"PATH": f"{Path(psql).parent}:/usr/bin:/bin", "PGHOST": str(server.socket_dir),
                   "PGPORT": str(server.port), "POSTGRES_USER": server.superuser,
                   "POSTGRES_DB": pg["environment"]["POSTGRES_DB"], "OPTUNA_DB_PASSWORD": password}
            r = subprocess.run(["bash", str(DOCKER / script)], env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            study_url = f"postgresql://{user}:{password}@127.0.0.1:{server.port}/{database}"
            with psycopg.connect(study_url) as conn:
                owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                     (database,)).fetchone()[0]
            assert owner == user
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(study_url.replace("second-password-2", "first-password-1"))
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(study_url.rsplit("/", 1)[0] + "/" + pg["environment"]["POSTGRES_DB"])
    finally:
        server.stop()


def required_from_env(value: str) -> str:
    """The variable a compose value takes from the host's environment with no default
    (``${NAME:?message}``: compose refuses to start without it); fails on anything else."""
    m = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", value)
    assert m, f"{value!r} is not a required ${{VAR:?...}} from the environment"
    return m.group(1)


def test_compose_mlflow_basic_auth(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    server = check_command(shlex.split(mlflow["command"]))
    # MLflow's own basic-auth app, installed with the package (mlflow[auth] brings Flask-WTF, which it imports)
    assert server["--app-name"] == "basic-auth"
    assert "basic-auth" in {e.name for e in importlib.metadata.entry_points(group="mlflow.app")}
    assert importlib.util.find_spec("flask_wtf") is not None
    assert re.search(r"^flask-wtf==", (DOCKER / "requirements.txt").read_text(), re.M)
    env = mlflow["environment"]
    # secrets only from the host's environment: the admin password and the CSRF key have no default
    assert required_from_env(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == "MLFLOW_ADMIN_PASSWORD"
    assert required_from_env(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"].startswith("${MLFLOW_ADMIN_USERNAME")
    # the auth config is a repo file mounted where MLFLOW_AUTH_CONFIG_PATH points, with no password in it
    (mount,) = [v for v in mlflow["volumes"] if v.split(":")[1] == env["MLFLOW_AUTH_CONFIG_PATH"]]
    ini = configparser.ConfigParser()
    ini.read_string((DOCKER / mount.split(":")[0]).read_text())
    shipped = configparser.ConfigParser()
    shipped.read(Path(importlib.util.find_spec("mlflow").origin).parent / "server/auth/basic_auth.ini")
    assert set(ini["mlflow"]) <= set(shipped["mlflow"]) | {"admin_password"}  # keys MLflow reads
    assert "admin_password" not in ini["mlflow"]
    assert ini["mlflow"]["default_permission"] in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
    # the users database on a named volume of its own
    auth_db = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert any(v.split(":")[0] in compose["volumes"] and auth_db.startswith(v.split(":")[1] + "/")
               for v in mlflow["volumes"]), auth_db
    assert auth_db.startswith("/shared/") and "/shared" in (DOCKER / "Dockerfile").read_text()
    # the health check needs no credentials (MLflow leaves /health unprotected)
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    # no secret written in docker/: every one is a reference to the environment
    for f in DOCKER.iterdir():
        assert not re.search(r"(PASSWORD|TOKEN|SECRET_KEY)[=:] *[A-Za-z0-9]{3,}", f.read_text()), f
        assert not re.search(r"://\w+:\w+@", f.read_text()), f  # user:password@ in a URI


def test_cluster_launcher_matches_compose(compose, cluster_yaml):
    head_c = flags(shlex.split(compose["services"]["ray-head"]["command"])[2:])
    head = [c for c in cluster_yaml["head_start_ray_commands"] if c.startswith("ray start")]
    worker = [c for c in cluster_yaml["worker_start_ray_commands"] if c.startswith("ray start")]
    h, w = check_command(shlex.split(head[0])), check_command(shlex.split(worker[0]))
    for key in ("--port", "--dashboard-port", "--ray-client-server-port"):
        assert h[key] == head_c[key], key
    assert w["--address"] == f"$RAY_HEAD_IP:{h['--port']}"
    assert cluster_yaml["docker"]["image"] == compose["services"]["ray-head"]["image"]
    opts = " ".join(cluster_yaml["docker"]["run_options"])
    storage = compose["services"]["ray-head"]["environment"]["PRUNETUNE_STORAGE_PATH"]
    assert f":{storage}" in opts and f"PRUNETUNE_STORAGE_PATH={storage}" in opts and "--gpus all" in opts
    assert "RAY_AUTH_MODE=token" in opts
    # the launcher passes run_options as written: a ${VARIABLE} of the user's shell would reach docker unexpanded
    assert "${" not in opts and "$(" not in opts
    # the Ray token travels as a file, to the path Ray reads it from on every node
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert cluster_yaml["file_mounts"] == {default: default}
    # the data a submitted search reads (README: --set data.root=/shared/data/...) is mounted like the results
    assert "/shared/data" in compose["x-prunetune"]["volumes"][1] and ":/shared/data" in opts


def test_dockerfile_pins_and_user():
    text = (DOCKER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    upper = {re.match(r"[\w-]+", d).group(): re.search(r"<=([\d.]+)", d) for d in deps}
    assert args["TORCH_VERSION"] == upper["torch"].group(1)
    assert args["TORCHVISION_VERSION"] == upper["torchvision"].group(1)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip install -r /tmp/requirements.txt" in text and "pip install --no-deps /opt/prunetune" in text
    # every runtime dependency is pinned in the image (torch and torchvision come from ARGs)
    pinned = {re.split(r"==", line)[0].lower().replace("_", "-")
              for line in (DOCKER / "requirements.txt").read_text().splitlines() if "==" in line}
    for dep in deps:
        name = re.match(r"[\w-]+", dep).group().lower().replace("_", "-")
        assert name in pinned or name in ("torch", "torchvision"), dep
    # the package's import packages are copied into the image
    for pkg in ("trainables", "tuning"):
        assert f"COPY {pkg} " in text


def test_readme_cluster_section_matches_the_files(compose):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for f in re.findall(r"docker/[\w.-]+", section):
        assert (REPO / f).is_file(), f
    assert "docker compose -f docker/compose.yaml up" in section
    for service in re.findall(r"--scale ([\w-]+)=", section):
        assert service in compose["services"]
    assert "prunetune submit" in section and jobs.DEFAULT_JOBS_ADDRESS.rsplit(":", 1)[1] in section
    assert "ray://" in section and compose["services"]["ray-head"]["command"].split("--ray-client-server-port")[1].split()[0] in section
