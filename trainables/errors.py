"""One error family for everything prunetune raises on purpose, as ``optuna.exceptions`` does.

Every error a user can meet is a :class:`PrunetuneError` whose message names the problem and
the fix in one line. The command line catches this one type, prints the message and exits
with the error's :attr:`~PrunetuneError.exit_code`:

- 2, :class:`InputError` and its subclasses: something the user gave is wrong or missing (an
  experiment file, a value, a dataset, a checkpoint, an address, a model reference);
- 1, :class:`PrunetuneError` itself and the runtime failures below it;
- 3, :class:`NoFeasiblePoint`: the search ran, but no point meets the budgets (every result kept).

Pure Python, no imports: both packages use it (``tuning`` imports ``trainables``, never the
reverse), and Ray ships these errors from trials to the driver as they are.
"""
from __future__ import annotations


class PrunetuneError(Exception):
    """Base of every error prunetune raises on purpose."""

    exit_code = 1


class InputError(PrunetuneError):
    """Something the user gave is wrong or missing; the message names it and the fix."""

    exit_code = 2


class SpecError(InputError, ValueError):
    """A problem in an experiment file or a ``--set`` value; the message names the key and the fix."""


class DataError(InputError):
    """A dataset is missing or malformed; the message says where and how to fix it."""


class CheckpointError(InputError, ValueError):
    """A checkpoint file is missing, unreadable or not ours."""


class DeviceError(InputError):
    """The requested training device is not there."""


class Diverged(InputError):
    """The training loss became NaN or Inf: the lr (an input) is too high."""

    def __init__(self, epoch: int, lr: float, loss: float, optimizer: str):
        self.epoch, self.lr, self.loss, self.optimizer = epoch, lr, loss, optimizer
        super().__init__(
            f"training diverged at epoch {epoch} with lr={lr:g} ({optimizer}): loss is {loss}. "
            "Lower [train] lr (e.g. 10x) or search a narrower lr range"
        )

    def __reduce__(self):  # Ray pickles it from a trial to the driver
        return Diverged, (self.epoch, self.lr, self.loss, self.optimizer)


class ModelError(InputError, ValueError):
    """A ``[model]`` that names no network or weights that do not fit, or a run, model alias or
    export request that cannot be served; says why."""


class NotFound(InputError, LookupError):
    """What a command needs is not there (an experiment, a finished search, the ``mlflow``
    command); the message says what there is or how to get it."""


class TrackingError(InputError, ConnectionError):
    """The MLflow tracking store cannot be reached or used."""


class StudyError(InputError, ConnectionError):
    """The Optuna study's database cannot be reached or used; the message names it without its password."""


class ClusterError(InputError, ConnectionError):
    """The Ray cluster cannot be reached, or its nodes cannot run the search as asked."""


class StorageError(InputError, ConnectionError):
    """``[search] storage_path`` on an object store that cannot be used as given: an unreachable
    endpoint, a missing bucket, refused credentials; the message names the fix."""


class SubmitError(InputError, ValueError):
    """A submission that cannot go ahead; the message names the fix."""


class SearchLocked(InputError):
    """Another live process runs a search in this directory; the message names its pid and host."""


class OrtError(PrunetuneError):
    """ONNX Runtime cannot export, load or run a model; the message names the model."""


class VerificationError(PrunetuneError):
    """A model, run here, does not give what its record says it gave when it was measured."""


class NoFeasiblePoint(PrunetuneError, LookupError):
    """The search ran, but no point meets the budgets; the message names the closest ones."""

    exit_code = 3
