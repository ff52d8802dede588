"""What object storage costs: the same 4-trial search (experiments/quickstart.toml) with its
results in a local directory and in an S3-compatible store on loopback (moto_server), the study
in a throwaway PostgreSQL server for both (an object store needs a database study).

Prints, per run: wall time of ``prunetune search`` and the bytes the search left (the
experiment directory; in the store, its objects plus the driver's local copy, which holds the
front's downloaded checkpoints). The bytes uploaded while the search ran (checkpoints Tune
replaces every epoch, those retention deletes) are not counted: moto keeps objects in memory and
its process's ``rchar`` counts far more than the uploads (104 GB for this search), so it is not
reported.

    python experiments/bench_storage.py            # ~10 min on 2 cores: run it alone
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from servers import PostgresServer, S3Server  # noqa: E402  (the test suite's real servers)

from trainables import measure  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def search(spec: Path, storage: str, env: dict[str, str], work: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tuning.cli", "search", str(spec), "--set", f"search.storage_path={storage}",
                        "--tracking-uri", f"sqlite:///{work}/mlflow.db"], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"search failed ({storage}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(REPO / "experiments" / "quickstart.toml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        tmp = Path(tmp)
        s3, pg = S3Server(tmp).start(), PostgresServer().start()
        try:
            env = {**os.environ, "PRUNETUNE_STUDY_STORAGE": pg.url(), "PRUNETUNE_WORK_DIR": str(tmp / "work"),
                   "RAY_USAGE_STATS_ENABLED": "0"}
            env.pop("PRUNETUNE_STORAGE_PATH", None)
            local_s, _ = search(Path(args.spec), str(tmp / "local"), env, tmp)
            local_bytes = du(tmp / "local")
            remote_s, _ = search(Path(args.spec), "s3://prunetune/rr", {**env, **s3.env}, tmp)
            client = s3.client()
            stored = sum(client.head_object(Bucket=s3.bucket, Key=k)["ContentLength"] for k in s3.keys("rr/"))
            copy = du(tmp / "work")
        finally:
            s3.stop()
            pg.stop()
    print(f"# bench_storage {datetime.date.today().isoformat()}: {Path(args.spec).name}, "
          f"{measure.cpu_name()} [{measure.cpu_flags() or 'no avx2'}], {os.cpu_count()} cores")
    print("| storage_path | wall time | bytes left |")
    print("|---|---|---|")
    print(f"| local directory | {local_s:.0f} s | {local_bytes / 1e6:.0f} MB |")
    print(f"| s3:// (moto_server on loopback) | {remote_s:.0f} s | {stored / 1e6:.0f} MB in the store + "
          f"{copy / 1e6:.0f} MB local copy |")


if __name__ == "__main__":
    main()
