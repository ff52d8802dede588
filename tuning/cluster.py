"""The Ray side of a search: the address, the connection, the shared-storage probe, the slots.

- :func:`check_address`: a Jobs API URL or a host:port where nothing listens fails in seconds,
  naming the fix, before anything is created.
- :func:`connect`: ``HOST:6379`` from a cluster node, ``ray://HOST:10001`` (Ray Client) from
  outside, else a local Ray; Tune's settings (:data:`TUNE_ENV`) go where its controller runs.
- :func:`check_storage`: on several nodes, every node must see ``storage_path`` (trial
  checkpoints are read back wherever a trial restarts); probed from a task on each node. An
  object store is written and read by this process and by a task on every node.
- :func:`check_target`: a ``[search] latency_target`` names a resource some alive node has.
- :func:`slots`: how many trials the connected cluster runs at once.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path

from trainables.errors import ClusterError, SpecError, StorageError
from tuning import storage
from tuning.spec import SearchConfig

# Tune settings for the process that runs Tune's controller (the driver, for the search's
# duration: tuning.driver; under Ray Client an actor on the cluster, through the job's runtime env).
TUNE_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the narrowed CLIReporter table
    # per-epoch reports carry val_accuracy only; the objectives arrive with the final report
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # one checkpoint kept per trial forces a state snapshot per epoch: expected, not a problem
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
_PROBE_TIMEOUT_S = 120


def check_address(address: str | None) -> None:
    """Fail in seconds, not minutes, on a Jobs API address or when nothing listens at a
    host:port Ray address (``address``, else ``$RAY_ADDRESS``; none: a local Ray, nothing to check)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{address!r} is a Ray dashboard / Jobs address: submit the search there with `prunetune submit FILE "
            f"--address {address}`, or attach this driver with --address ray://HOST:10001 (or HOST:6379 on a node)")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and the like: let Ray resolve them
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}). Start one with "
            "`ray start --head`, fix --address / RAY_ADDRESS, or leave both unset for a local Ray"
        ) from None


def connect(address: str | None = None) -> None:
    """Attach to ``address`` (or ``$RAY_ADDRESS``): ``HOST:6379`` from a cluster node, or
    ``ray://HOST:10001`` (Ray Client) from outside; else start a local Ray. No-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)
    if address and address.startswith("ray://"):
        _client_init(address)
    elif address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def _client_init(address: str, attempts: int = 3) -> None:
    """``ray.init`` through Ray Client. The head starts a server process per client, and that
    start can fail on a busy head ("Starting Ray client server failed": once in our test runs,
    the head's log naming no cause); the address answered (``check_address``), so try again."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, runtime_env={"env_vars": TUNE_ENV})
            return
        except Exception as e:
            if attempt == attempts:
                raise
            print(f"prunetune: warning: Ray Client at {address} failed to start a session "
                  f"({str(e).strip().splitlines()[-1][:200]}); trying again ({attempt + 1}/{attempts})",
                  file=sys.stderr, flush=True)
            ray.shutdown()  # whatever half of a client connection the failure left
            time.sleep(3)


def check_storage(storage_path: str) -> None:
    """On a cluster of several nodes, trial checkpoints are written where the trial runs and
    read back where it restarts: a ``storage_path`` that only this machine sees loses them.
    Probe it before any training: write a marker and ask one task on every alive node whether
    it sees it. Raises SpecError naming the blind nodes and the fix, ConnectionError naming
    the nodes that did not answer."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if storage.is_remote(storage_path):
        return _check_object_store(storage_path, nodes)
    if len(nodes) < 2:
        return
    marker = Path(storage_path) / f".prunetune-probe-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("prunetune")
    try:
        seen = _sees_on_each(nodes, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    name = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in nodes]
    silent = [name[i] for i, ok in enumerate(seen) if ok is None]
    if silent:
        raise ClusterError(f"{len(silent)} of {len(nodes)} nodes did not answer the storage_path check within "
                              f"{_PROBE_TIMEOUT_S} s ({', '.join(silent)}); check them with `ray status` and try again")
    blind = [name[i] for i, ok in enumerate(seen) if not ok]
    if blind:
        raise SpecError(
            f"search.storage_path {storage_path} is not shared: {len(blind)} of {len(nodes)} nodes cannot see it "
            f"({', '.join(blind)}), so a trial restarted on another node would lose its checkpoints. Mount a "
            "shared filesystem (NFS, a shared volume) at the same path on every node and point at it: "
            "--set search.storage_path=/shared/ray_results or PRUNETUNE_STORAGE_PATH")
    print(f"storage: {storage_path} is shared by all {len(nodes)} nodes", flush=True)


def _check_object_store(uri: str, nodes: list[dict]) -> None:
    """An object store: a task on every alive node writes, reads back and deletes a marker there
    (each node needs the store's credentials and address in its own environment; this process
    probed it before connecting to Ray). Raises StorageError with the first node's reason,
    ClusterError naming nodes that did not answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def probe(u: str) -> str | None:
        try:
            storage.probe(u)
        except StorageError as e:
            return str(e)
        return None

    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(uri)
            for n in nodes]
    answered, _ = ray.wait(refs, num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
    name = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in nodes]
    silent = [name[i] for i, r in enumerate(refs) if r not in answered]
    if silent:
        raise ClusterError(f"{len(silent)} of {len(nodes)} nodes did not answer the storage_path check within "
                           f"{_PROBE_TIMEOUT_S} s ({', '.join(silent)}); check them with `ray status` and try again")
    failed = [(name[i], why) for i, r in enumerate(refs) if (why := ray.get(r))]
    if failed:
        raise StorageError(f"{len(failed)} of {len(nodes)} nodes cannot use the object store ({failed[0][0]}: "
                           f"{failed[0][1]}); give every node the store's credentials and address in its environment")
    print(f"storage: {uri} is read and written by all {len(nodes)} nodes", flush=True)


def _sees_on_each(nodes: list[dict], path: str) -> list[bool | None]:
    """Whether a task pinned to each node sees the file ``path``; None where none answered."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str) -> bool:
        return os.path.isfile(p)

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
            for n in nodes]
    answered, _ = ray.wait(refs, num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
    return [ray.get(r) if r in answered else None for r in refs]


def check_target(search: SearchConfig) -> None:
    """Before any training: a ``[search] latency_target`` must name a resource some alive node has."""
    import ray

    if search.latency_target and not target_nodes(search.latency_target):
        have = sorted({r for n in ray.nodes() if n["Alive"] for r in n["Resources"]
                       if r not in ("CPU", "GPU", "memory", "object_store_memory") and not r.startswith("node:")})
        raise ClusterError(f"[search] latency_target = {search.latency_target!r}: no node of the cluster has that "
                           f"resource (custom resources here: {', '.join(have) or 'none'}); start the node that stands "
                           f"for your deployment hardware with `ray start --resources '{{\"{search.latency_target}\": 1}}'`")


def target_nodes(target: str) -> list[dict]:
    """The alive nodes with a CPU that stand for ``target`` (a custom resource; "": every one)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1
            and (not target or n["Resources"].get(target, 0) > 0)]


def slots(search: SearchConfig) -> int:
    """How many trials the connected cluster can run at once with ``search``'s resources."""
    import ray

    total = ray.cluster_resources()
    n = int(total.get("CPU", 1) // search.cpus_per_trial)
    if search.gpus_per_trial:
        n = min(n, int(total.get("GPU", 0) // search.gpus_per_trial))
    return max(1, min(n, search.max_concurrent_trials or n))
