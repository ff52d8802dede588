"""Real server processes for tests: an MLflow tracking server (SQLite backend), a Ray
cluster of several nodes on loopback (`ray start --head` + `ray start --address`), an
S3-compatible object store (moto_server) and a throwaway PostgreSQL server (`initdb` + `pg_ctl`).
Each starts and stops its own processes."""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

BIN = Path(sys.executable).parent  # ray, mlflow, prunetune of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.is_file() else ""
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s\n{tail}")


class MlflowServer:
    """`mlflow server` on a free port with a SQLite backend store (its own, or ``backend``);
    stop() and start() again keep the port and the database (a server outage). With ``auth``, MLflow's basic
    authentication (``--app-name basic-auth``) with a random admin password: ``credentials``
    is the environment a client needs."""

    def __init__(self, workdir: Path, auth: bool = False, backend: str | None = None, artifacts: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.backend = backend or f"sqlite:///{workdir}/server.db"
        self.artifacts = artifacts or str(workdir / "artifacts")  # --artifacts-destination: a directory or s3://...
        self.env = env or {}  # the server's own (an object store's credentials)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "mlflow-server.log"
        self.auth = auth
        self.credentials = {"MLFLOW_TRACKING_USERNAME": "admin",
                            "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(12)} if auth else {}

    def _auth_env(self) -> dict[str, str]:
        """The server's side of basic-auth: its config file (users in the workdir), the admin
        account from the environment (as docker/compose.yaml does), the CSRF key."""
        ini = self.workdir / "auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.workdir}/auth.db\n"
                       "admin_username = admin\n")
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.credentials["MLFLOW_TRACKING_PASSWORD"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}

    def start(self) -> "MlflowServer":
        log = self.log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        extra = ["--app-name", "basic-auth"] if self.auth else []
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", *extra, "--backend-store-uri", self.backend,
             "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, **self.env, **(self._auth_env() if self.auth else {})})

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{self.url}/health", timeout=3).status == 200
            except OSError:
                return False

        wait_for(healthy, "mlflow server start", 120, log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


class S3Server:
    """An S3-compatible object store on loopback (moto's ``moto_server``) that checks credentials:
    its first requests (free, before authentication is enforced) create an IAM user with a key
    that may do anything and the bucket ``bucket``; ``env`` is what a client needs (the standard
    AWS variables, the endpoint in ``AWS_ENDPOINT_URL``)."""

    FREE_REQUESTS = 4  # create_user, put_user_policy, create_access_key, create_bucket

    def __init__(self, workdir: Path, bucket: str = "prunetune") -> None:
        self.workdir, self.bucket, self.port = workdir, bucket, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self) -> "S3Server":
        import boto3

        log = self.workdir / "moto-server.log"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.FREE_REQUESTS)}
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, env=env)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, "moto_server start", 60, log)
        anon = dict(endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="bootstrap",
                    aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="prunetune")
        iam.put_user_policy(UserName="prunetune", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="prunetune")["AccessKey"]
        boto3.client("s3", **anon).create_bucket(Bucket=self.bucket)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class RayCluster:
    """A Ray head (dashboard + Jobs API, token authentication) and extra nodes, all on this
    machine, each node a separate raylet. Node loss is simulated for real: SIGKILL of a node's
    raylet and every process under it (its workers, agents)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.jobs_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        self.env = {
            **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            # notice a lost node in seconds (defaults take ~30 s)
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.nodes: dict[int, str] = {}  # node manager port -> node id

    def _ray(self, *args: str) -> None:
        log = self.workdir / "ray-start.log"
        with open(log, "a") as f:
            r = subprocess.run([str(BIN / "ray"), *args], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=180)
        if r.returncode:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{log.read_text()[-3000:]}")

    def start(self, head_cpus: int = 1) -> "RayCluster":
        manager_port = free_port()
        self._ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                  "--num-cpus", str(head_cpus), "--num-gpus", "0", "--include-dashboard", "true",
                  "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                  "--ray-client-server-port", str(self.client_port),
                  "--node-manager-port", str(manager_port))
        self.nodes[manager_port] = self._node_id(manager_port)
        return self

    def add_node(self, cpus: int = 1, private_dir: Path | None = None, resources: dict | None = None) -> str:
        """Start one more node (with custom ``resources``); with ``private_dir``, the node runs in its
        own mount namespace with an empty tmpfs over that directory: a machine that does not share it."""
        manager_port = free_port()
        args = ["start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                "--num-gpus", "0", "--node-manager-port", str(manager_port)]
        if resources:
            args += ["--resources", json.dumps(resources)]
        if private_dir is None:
            self._ray(*args)
        else:
            script = f"mount -t tmpfs none {private_dir} && exec {BIN / 'ray'} {' '.join(args)}"
            r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=self.env,
                               capture_output=True, text=True, timeout=180)
            if r.returncode:
                raise RuntimeError(f"node in a private mount namespace did not start: {r.stderr[-2000:]}")
        self.nodes[manager_port] = self._node_id(manager_port)
        return self.nodes[manager_port]

    def _node_id(self, manager_port: int) -> str:
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([(n['NodeManagerPort'], n['NodeID']) for n in ray.nodes() if n['Alive']]))"
                % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        pairs = dict(json.loads(out.stdout.strip().splitlines()[-1]))
        return pairs[manager_port]

    def kill_node(self, node_id: str) -> None:
        (manager_port,) = [p for p, n in self.nodes.items() if n == node_id]
        raylets = [int(d.name) for d in Path("/proc").glob("[0-9]*") if _is_raylet(d, manager_port)]
        assert raylets, f"no raylet with node manager port {manager_port}"
        victims = [p for r in raylets for p in _descendants(r)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        del self.nodes[manager_port]

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)


def _is_raylet(proc_dir: Path, manager_port: int) -> bool:
    try:
        cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"/raylet") and f"--node_manager_port={manager_port}".encode() in cmd


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (``initdb``, ``pg_ctl``, ``postgres``): the one
    ``initdb`` on PATH is in (links followed), else Debian's newest ``/usr/lib/postgresql/*/bin``;
    None when they are not installed."""
    on_path = shutil.which("initdb")
    found = [Path(on_path).resolve().parent] if on_path else []
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True,
                    key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return next((d for d in found if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


class PostgresServer:
    """A throwaway PostgreSQL server: ``initdb`` into a temp dir, ``postgres`` on a free loopback port
    (``listen_addresses=127.0.0.1``) with its socket in that dir, and a login role ``user`` with a
    random password owning a database of the same name: :meth:`url` is what a search is given.
    Over TCP every role needs its password (scram-sha-256); the superuser (the OS user the server
    runs as) is trusted on the socket only (:meth:`admin`). initdb and postgres refuse to run as
    root, as the tests and CI do: then they run as the ``postgres`` system user, else ``nobody``
    (``runuser``), which owns the temp dir. stop() ends the server and removes the dir."""

    def __init__(self, user: str = "optuna") -> None:
        self.bin = postgres_bin()
        assert self.bin is not None, "PostgreSQL's server programs are not installed"
        self.port = free_port()
        self.user, self.database, self.password = user, user, secrets.token_hex(12)
        self.os_user = _unprivileged_user() if os.geteuid() == 0 else None
        self.superuser = self.os_user or pwd.getpwuid(os.geteuid()).pw_name
        self.workdir = Path(tempfile.mkdtemp(prefix="prunetune-pg-"))  # in /tmp: pytest's dirs are root's only
        self.data, self.socket_dir = self.workdir / "data", self.workdir / "socket"
        self.log = self.workdir / "server.log"

    def url(self, password: str | None = None, port: int | None = None) -> str:
        """The database's URL for the role, with its password (or ``password``; "" for none)."""
        password = self.password if password is None else password
        auth = f"{self.user}:{password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{self.database}"

    def start(self) -> "PostgresServer":
        self.socket_dir.mkdir()
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            for path in (self.workdir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "--auth-local=trust", "--auth-host=scram-sha-256",
                  "--encoding=UTF8", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.socket_dir} "
                   "-c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        from psycopg import sql

        with self.admin() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(self.user),
                                                                          sql.Literal(self.password)))
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.database),
                                                                     sql.Identifier(self.user)))
        return self

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        """A cursor of the superuser on the server's socket (autocommit)."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=self.superuser, dbname="postgres",
                             autocommit=True) as conn, conn.cursor() as cur:
            yield cur

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin / program), *args]
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        r = subprocess.run(argv, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if r.returncode:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}\n{log}")


def _unprivileged_user() -> str:
    """The system user PostgreSQL runs as here: ``postgres`` if there is one, else ``nobody``."""
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")

