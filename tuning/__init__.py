"""prunetune's driver, from Python: the same search ``prunetune search`` runs.

    import tuning

    spec = tuning.load("experiments/quickstart.toml", ["search.num_samples=2"])  # or tuning.from_dict({...})
    result = tuning.search(spec)             # or tuning.resume("ray_results/quickstart-...")
    result.front.rows                        # the Pareto front (pareto.csv), result.front.aliases
    result.grid, result.study                # Ray Tune's ResultGrid, the Optuna study

A search leaves the caller's environment variables and MLflow tracking URI as it found them (a
local Ray it started stays up, as ``ray.init`` does). Every error it raises on purpose is a
:class:`PrunetuneError` whose message names the problem and the fix.
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it; imported on first use, so `prunetune --help` stays quick
_FACE = {"load": "tuning.spec", "from_dict": "tuning.spec", "Spec": "tuning.spec", "search": "tuning.driver", "resume": "tuning.driver",
         "SearchResult": "tuning.results", "Front": "tuning.front", "Rules": "tuning.front",
         "Objective": "tuning.pareto", "PrunetuneError": "trainables.errors", "InputError": "trainables.errors",
         "NoFeasiblePoint": "trainables.errors"}
__all__ = sorted(_FACE)


def __getattr__(name: str) -> Any:
    if name not in _FACE:
        raise AttributeError(f"module 'tuning' has no attribute {name!r}")
    return getattr(importlib.import_module(_FACE[name]), name)
