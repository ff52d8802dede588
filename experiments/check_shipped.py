"""What ships is what was measured, end to end, for every version of a registered model.

For each version: the file its trial built and measured (``checkpoint/points/*.onnx`` of the trial
run), the version served by a real ``mlflow models serve`` process, and the file ``prunetune
export`` writes are run over the version's held-out test images; the three must give the same
labels, and their accuracy must be the version's recorded test accuracy. Prints one row per
version and the CPU; exits 1 if any differs.

    python experiments/check_shipped.py [--model quickstart] [--tracking-uri sqlite:///mlflow.db]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def served_labels(uri: str, ref: str, images: np.ndarray, port: int, log: Path) -> np.ndarray:
    """Labels from ``mlflow models serve -m REF`` (a real server process) for uint8 images."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", ref, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=3).status == 200:
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not answer: {log.read_text()[-2000:]}") from None
                time.sleep(1)
        labels = []
        for i in range(0, len(images), 64):
            body = json.dumps({"inputs": images[i : i + 64].tolist()}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                labels += json.loads(r.read())["predictions"]["label"]
        return np.array(labels)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="quickstart")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--port", type=int, default=5099)
    args = ap.parse_args()

    import pandas as pd
    from mlflow import MlflowClient

    from trainables import measure, ort
    from tuning import runs, verify

    uri = runs.tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="prunetune-check-") as d:
        for v in sorted(client.search_model_versions(f"name = '{args.model}'"), key=lambda v: int(v.version)):
            record = verify.Record.from_tags(v.tags, f"models:/{args.model}/{v.version}")
            test = verify.test_images(record)
            images, truth = test.x.permute(0, 2, 3, 1).contiguous().numpy(), test.y.numpy()
            trial_file = client.download_artifacts(v.tags["trial_run_id"], f"checkpoint/{v.tags['artifact']}", d)
            measured = ort.OrtModel(Path(trial_file).read_bytes()).predict(images)
            export = Path(d) / f"v{v.version}.onnx"
            out = subprocess.run([sys.executable, "-m", "tuning.cli", "export", f"models:/{args.model}/{v.version}",
                                  "-o", str(export), "--tracking-uri", uri], capture_output=True, text=True)
            exported = ort.OrtModel(export.read_bytes()).predict(images) if export.is_file() else np.array([])
            served = served_labels(uri, f"models:/{args.model}/{v.version}", images, args.port, Path(d) / "serve.log")
            same = np.array_equal(measured, served) and np.array_equal(measured, exported)
            accuracy = float((measured == truth).mean())
            ok &= same and abs(accuracy - record.test_accuracy) < 1e-9 and out.returncode == 0
            rows.append({"version": v.version, "point": f"{v.tags['method']} {float(v.tags['ratio']):g}"
                         f"{' int8' if v.tags['int8'] == 'True' else ''}", "aliases": ",".join(
                             a for a, n in client.get_registered_model(args.model).aliases.items() if str(n) == str(v.version)),
                         "images": len(truth), "recorded": record.test_accuracy, "measured_file": accuracy,
                         "served": float((served == truth).mean()), "exported": float((exported == truth).mean()),
                         "same_labels": same, "export_exit": out.returncode})
    print(f"CPU {measure.cpu_name()} [{measure.cpu_flags()}]; {args.model} in {uri}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print("identical labels and recorded accuracy everywhere" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
