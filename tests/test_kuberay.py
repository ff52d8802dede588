"""docker/kuberay-*.yaml: no Kubernetes runs here, so check that the RayJob agrees with the package
and with the compose cluster: it runs the image compose builds, its entrypoint is a `prunetune search`
of the spec its ConfigMap mounts, that spec loads and validates with the environment the pods get,
the head takes no trials and the workers have GPUs, every Secret it reads is in the example Secrets,
the environment variables are the ones the package (and MLflow, and pyarrow) read, no credential
is written in the files, and README's Kubernetes part names what is there."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import mmap
import re
import shlex
import tomllib
import urllib.parse
import warnings
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import REPO
from tuning import cli, jobs, runs
from tuning import spec as spec_mod

DOCKER = REPO / "docker"
# in docker/ itself, not a folder of their own: test_docker.py reads every entry of docker/ as a file
# (and scans it for written credentials, these included)
RAYJOB = DOCKER / "kuberay-rayjob.yaml"
SECRETS = DOCKER / "kuberay-secrets.example.yaml"
GPU = "nvidia.com/gpu"


def documents(path: Path) -> dict[tuple[str, str], dict]:
    """The YAML documents of a manifest file by (kind, name); a name used twice is an error
    (kubectl would apply the second over the first)."""
    out: dict[tuple[str, str], dict] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{path.name}: {key} defined twice"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def manifest() -> dict[tuple[str, str], dict]:
    return documents(RAYJOB)


@pytest.fixture(scope="module")
def rayjob(manifest) -> dict:
    (job,) = [d for (kind, _), d in manifest.items() if kind == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    return job


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    """The example Secrets: name -> stringData."""
    docs = documents(SECRETS)
    assert {kind for kind, _ in docs} == {"Secret"}
    return {name: doc["stringData"] for (_, name), doc in docs.items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def head(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


def groups(rayjob: dict) -> list[dict]:
    """The head group and every worker group."""
    return [head(rayjob), *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    """The container KubeRay runs `ray start` in: the pod's first."""
    return group["template"]["spec"]["containers"][0]


def limits(group: dict) -> dict:
    return ray_container(group).get("resources", {}).get("limits", {})


def cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def secret_refs(node) -> list[dict]:
    """Every secretKeyRef anywhere under ``node``."""
    if isinstance(node, dict):
        return ([node["secretKeyRef"]] if "secretKeyRef" in node else []) + \
            [r for k, v in node.items() if k != "secretKeyRef" for r in secret_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in secret_refs(v)]
    return []


def mounted_spec(rayjob: dict, manifest: dict) -> tuple[PurePosixPath, str]:
    """The entrypoint's experiment file and its text: the ConfigMap key mounted at that path on the
    head, where a Ray Job's driver runs."""
    args = cli._parser().parse_args(shlex.split(rayjob["spec"]["entrypoint"])[1:])
    path = PurePosixPath(args.file)
    pod = head(rayjob)["template"]["spec"]
    (mount,) = [m for m in ray_container(head(rayjob))["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = manifest[("ConfigMap", volume["configMap"]["name"])]
    assert path.name in configmap["data"], f"{path} is not a key of ConfigMap {volume['configMap']['name']}"
    return path, configmap["data"][path.name]


def resolved_env(rayjob: dict, secrets: dict) -> dict[str, str]:
    """The head's environment as the pod gets it with the example Secrets (an optional key that
    is absent leaves the variable unset, as Kubernetes does)."""
    env = {}
    for var in ray_container(head(rayjob))["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets[ref["name"]] or not ref.get("optional"):
                env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def has_study_storage() -> bool:
    """Whether the package has ``[search] study_storage`` yet (issue 21: added beside this file)."""
    return "study_storage" in {f.name for f in dataclasses.fields(spec_mod.SearchConfig)}


def test_rayjob_runs_the_compose_image_and_ray(rayjob, compose):
    image = compose["x-prunetune"]["image"]
    for group in groups(rayjob):
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == image, container["name"]
    # KubeRay picks its defaults by rayVersion: the ray the image installs
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (DOCKER / "requirements.txt").read_text(), re.M))
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]
    # token authentication, as the compose cluster has (the operator makes the token)
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == compose["x-prunetune"]["environment"][
        "RAY_AUTH_MODE"]
    # a one-off cluster: deleted when the search ends, after a while to read its logs
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["ttlSecondsAfterFinished"] > 0


def test_entrypoint_is_a_search_of_the_mounted_spec(rayjob, manifest):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    # the program is the package's console script, and it parses the arguments as a search
    (script,) = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == argv[0]]
    assert script.value == f"{cli.__name__}:main"
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "search" and args.func is cli.cmd_search
    # inside a Ray Job, Ray sets RAY_ADDRESS for the driver: no address to pass
    assert args.address is None
    path, text = mounted_spec(rayjob, manifest)
    assert str(path) == args.file and text.strip()


def test_spec_in_the_configmap_is_valid(rayjob, manifest, compose, tmp_path, monkeypatch):
    _, text = mounted_spec(rayjob, manifest)
    (tmp_path / "search.toml").write_text(text)
    # storage from the environment, as on the pods (a filesystem path here: see the object-store test)
    monkeypatch.setenv("PRUNETUNE_STORAGE_PATH", str(tmp_path / "results"))
    monkeypatch.delenv("PRUNETUNE_STUDY_STORAGE", raising=False)
    spec = spec_mod.load(tmp_path / "search.toml")
    # the file leaves where results and the study go to the pods' environment
    assert spec.search.storage_path == str(tmp_path / "results")
    assert not {k for k in spec.given if k.startswith("search.") and "storage" in k}, spec.given
    # a Ray Job runs in a scratch directory Ray deletes: the paths the search uses pass the check
    # `prunetune submit` makes before a job for the same reason
    jobs._check_paths(spec)
    # the MLflow experiment is named by the file, not by the mount's file name (every spec would be "search")
    assert "name" in tomllib.loads(text)
    # the data go where the image lets its user write
    dockerfile = (DOCKER / "Dockerfile").read_text()
    made = re.search(r"mkdir -p ([^&\n]+)", dockerfile).group(1).split()
    assert any(spec.data.root.startswith(d + "/") for d in made), (spec.data.root, made)
    # one trial fits in one GPU worker pod
    gpu_groups = [g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"] if GPU in limits(g)]
    assert gpu_groups and spec.search.gpus_per_trial > 0
    for g in gpu_groups:
        assert int(limits(g)[GPU]) >= spec.search.gpus_per_trial
        assert cpus(limits(g)["cpu"]) >= spec.search.cpus_per_trial


def test_spec_in_the_configmap_on_object_storage(rayjob, manifest, secrets, tmp_path, monkeypatch):
    """With the pods' environment exactly (the bucket, the study's database): needs the package's
    ``[search] study_storage``, which an object-store storage_path requires."""
    if not has_study_storage():
        pytest.skip("the package has no [search] study_storage yet (issue 21): s3:// storage does not validate")
    env = resolved_env(rayjob, secrets)
    for name in ("AWS_ENDPOINT_URL", "PRUNETUNE_STUDY_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _, text = mounted_spec(rayjob, manifest)
    (tmp_path / "search.toml").write_text(text)
    spec = spec_mod.load(tmp_path / "search.toml")
    assert spec.search.storage_path == env["PRUNETUNE_STORAGE_PATH"]
    assert spec.search.study_storage == env["PRUNETUNE_STUDY_STORAGE"]
    # the image has the driver SQLAlchemy picks for that URL (psycopg for postgresql://, psycopg2-binary's ...)
    from sqlalchemy.engine import make_url

    driver = make_url(spec.search.study_storage).get_driver_name()
    pinned = re.findall(r"^([\w-]+)==", (DOCKER / "requirements.txt").read_text(), re.M)
    assert any(name == driver or name.startswith(driver + "-") for name in pinned), driver


def test_head_takes_no_trials_and_workers_have_gpus(rayjob, compose):
    with warnings.catch_warnings():  # ray's CLI module imports Serve, whose pydantic models warn
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import start

    options = {o for p in start.params for o in p.opts}
    for group in groups(rayjob):
        # KubeRay passes rayStartParams to `ray start` as --key=value
        assert {f"--{k}" for k in group["rayStartParams"]} <= options, group["rayStartParams"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # the CRD wants strings
    # the head: no CPU or GPU for trials, as compose's ray-head
    params = head(rayjob)["rayStartParams"]
    compose_head = shlex.split(compose["services"]["ray-head"]["command"])
    assert params["num-cpus"] == "0" == compose_head[compose_head.index("--num-cpus") + 1]
    assert params.get("num-gpus", "0") == "0" and GPU not in limits(head(rayjob))
    assert GPU not in ray_container(head(rayjob)).get("resources", {}).get("requests", {})
    # the Jobs API the submitter talks to is the port `prunetune submit` defaults to
    ports = {p["name"]: p["containerPort"] for p in ray_container(head(rayjob))["ports"]}
    assert ports["dashboard"] == int(jobs.DEFAULT_JOBS_ADDRESS.rsplit(":", 1)[1])
    # a worker group with a GPU per pod, whose pods offer Ray their CPUs and GPUs
    workers = [g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"] if int(limits(g).get(GPU, 0)) >= 1]
    assert workers
    for g in workers:
        assert g["rayStartParams"].get("num-gpus") != "0" and g["rayStartParams"].get("num-cpus") != "0"
        assert 1 <= g["replicas"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # Ray's object store is /dev/shm (compose: shm_size), which a pod caps at 64 MB unless a memory volume is there
    assert compose["x-prunetune"]["shm_size"]
    for group in groups(rayjob):
        pod = group["template"]["spec"]
        memory = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in memory for m in ray_container(group)["volumeMounts"])


def test_every_secret_reference_is_in_the_example(rayjob, secrets):
    refs = secret_refs(rayjob)
    assert refs
    used = {(r["name"], r["key"]) for r in refs}
    defined = {(name, key) for name, data in secrets.items() for key in data}
    assert used <= defined, used - defined
    assert defined <= used, f"keys nothing reads: {defined - used}"
    # the `kubectl create secret` commands in the example's comment make the same Secrets and keys
    comment = "\n".join(line.lstrip("# ") for line in SECRETS.read_text().splitlines() if line.startswith("#"))
    commands = re.split(r"kubectl create secret generic ", comment.replace("\\\n", " "))[1:]
    created = {(c.split()[0], key) for c in commands for key in re.findall(r"--from-literal=([\w-]+)=", c)}
    assert created == defined


def test_environment_is_what_the_package_reads(rayjob, compose):
    # the driver (head) and the trials (workers) write to MLflow and to storage_path alike
    envs = [ray_container(g)["env"] for g in groups(rayjob)]
    assert all(e == envs[0] for e in envs)
    env = {e["name"]: e for e in envs[0]}
    source = "".join(p.read_text() for d in ("tuning", "trainables") for p in (REPO / d).glob("*.py"))
    # prunetune's own: every one is read by the package (study storage: once [search] study_storage exists)
    ours = {n for n in env if n.startswith("PRUNETUNE_")}
    assert {"PRUNETUNE_STORAGE_PATH", "PRUNETUNE_STUDY_STORAGE"} <= ours
    pending = set() if has_study_storage() else {"PRUNETUNE_STUDY_STORAGE"}
    assert {n for n in ours if f'"{n}"' not in source} <= pending
    # MLflow's: variables MLflow reads; the URI the package reads too, and the credentials are the ones it
    # hands to jobs, never in the URI (which the package refuses)
    import mlflow.environment_variables as mlflow_env

    mlflow_names = {n for n in env if n.startswith("MLFLOW_")}
    assert all(getattr(mlflow_env, n).name == n for n in mlflow_names)
    assert '"MLFLOW_TRACKING_URI"' in source and mlflow_names - {"MLFLOW_TRACKING_URI"} <= set(runs.CREDENTIAL_ENV)
    uri = env["MLFLOW_TRACKING_URI"]["value"]
    assert runs.tracking_uri(uri) == uri
    mlflow_cmd = shlex.split(compose["services"]["mlflow"]["command"])
    assert urllib.parse.urlsplit(uri).port == int(mlflow_cmd[mlflow_cmd.index("--port") + 1])
    # storage: an object store (pods share no filesystem), reached through pyarrow (Ray's storage layer),
    # whose AWS SDK reads the AWS_ variables
    assert urllib.parse.urlsplit(env["PRUNETUNE_STORAGE_PATH"]["value"]).scheme == "s3"
    import pyarrow
    import pyarrow.fs

    assert hasattr(pyarrow.fs, "S3FileSystem")  # this pyarrow was built with S3
    aws = {n for n in env if n.startswith("AWS_")}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= aws
    (lib,) = [p for p in Path(pyarrow.__file__).parent.glob("libarrow.so*") if not p.is_symlink()]
    with lib.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
        assert all(binary.find(n.encode() + b"\0") >= 0 for n in aws), aws
    # every variable is one of those
    assert set(env) == ours | mlflow_names | aws


def test_no_credential_in_the_files(secrets):
    for f in (RAYJOB, SECRETS):
        text = f.read_text()
        assert not re.search(r"(PASSWORD|TOKEN|SECRET_KEY)[=:] *[A-Za-z0-9]{3,}", text), f
        assert not re.search(r"://\w+:\w+@", text), f  # user:password@ in a URI
    placeholder = re.compile(r"<[\w-]+>")
    for name, data in secrets.items():
        for key, value in data.items():
            parts = urllib.parse.urlsplit(value)
            if parts.scheme and parts.netloc:  # an address: any password in it is a placeholder
                assert parts.password is None or placeholder.fullmatch(parts.password), (name, key)
            else:
                assert placeholder.fullmatch(value), (name, key, value)


def test_readme_kubernetes_part_matches_the_files(rayjob, secrets):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    part = section.split("**On Kubernetes (KubeRay).**", 1)[1]
    for f in re.findall(r"docker/[\w./-]+\w", part):
        assert (REPO / f).is_file(), f
    assert "helm install kuberay-operator kuberay/kuberay-operator" in part
    for name in secrets:
        assert f"kubectl create secret generic {name}" in part, name
    assert f"kubectl apply -f {RAYJOB.relative_to(REPO)}" in part
    job = rayjob["metadata"]["name"]
    assert f"kubectl get rayjob {job}" in part and f"kubectl logs -f job/{job}" in part
    # the image pushed is the one to set in the manifest, and the MLflow UI is the server the pods use
    assert "docker push" in part
    env = {e["name"]: e for e in ray_container(head(rayjob))["env"]}
    port = urllib.parse.urlsplit(env["MLFLOW_TRACKING_URI"]["value"]).port
    assert f"kubectl port-forward svc/mlflow {port}:{port}" in part and f"http://localhost:{port}" in part
