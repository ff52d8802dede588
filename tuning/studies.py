"""Where a search's Optuna study lives, and how it is reached with no password ever written down.

- ``[search] study_storage`` empty (the default when ``$PRUNETUNE_STUDY_STORAGE`` is unset): the
  SQLite file ``optuna.db`` in the experiment directory, the study named after the spec;
- an Optuna RDB URL (``postgresql://optuna@db:5432/optuna``; mysql and sqlite work too): a database
  that many searches share, so each study is named after its experiment directory
  (``<name>-<time>-<6 hex>``) and two searches of one spec never share one. Results in an object
  store (``storage_path = "s3://..."``) need this: there is no file system for ``optuna.db``.

The password: the spec holds the URL as given, in memory only. Whatever records a spec writes
:func:`public` (the URL without its password: :meth:`tuning.spec.Spec.to_dict`), and so does every
line printed. A resumed search reads the recorded URL back and takes the password from the
environment (:func:`with_password`): ``$PRUNETUNE_STUDY_STORAGE`` when it names the same database,
else libpq's own ``PGPASSWORD`` / ``~/.pgpass``, which psycopg reads when a URL has none. Tune
pickles the searcher into the experiment directory, its storage with it: :class:`Storage` pickles
the URL without the password and takes it from the environment again when Tune restores it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from trainables.errors import StudyError
from tuning.names import STUDY_FILE

if TYPE_CHECKING:
    from tuning.spec import Spec

ENV = "PRUNETUNE_STUDY_STORAGE"  # [search] study_storage's default, and on resume the password
DIALECTS = ("postgresql", "mysql", "sqlite")  # the databases Optuna's RDB storage supports
EXAMPLE = "postgresql://optuna@HOST:5432/optuna"
HOW_TO_SET = (f'[search] study_storage = "{EXAMPLE}" (its password in PGPASSWORD), or export '
              f"{ENV}=postgresql://optuna:PASSWORD@HOST:5432/optuna")
_CONNECT_TIMEOUT_S = 10  # a host that drops packets fails the check in seconds, not minutes


def problem(url: str) -> str | None:
    """Why ``url`` cannot hold a study (one clause naming the fix), or None; "" is the SQLite file."""
    if not url:
        return None
    try:
        backend = make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        return f"{public(url)!r} is not a database URL; use an Optuna storage URL: {HOW_TO_SET}"
    if backend not in DIALECTS:
        return (f"{public(url)!r}: Optuna keeps studies in {', '.join(DIALECTS)} databases, not {backend!r}; "
                f"use e.g. {HOW_TO_SET}")
    return None


def is_server(url: str) -> bool:
    """``url`` names a database server (not a SQLite file): what results in an object store need."""
    return bool(url) and make_url(url).get_backend_name() != "sqlite"


def public(url: str) -> str:
    """``url`` without its password: what is printed and recorded."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:  # not a URL SQLAlchemy reads: drop anything between "user:" and "@"
        return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1@", url)
    if parsed.password is None:
        return url
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return bare.render_as_string(hide_password=False)  # (URL.set(password=None) keeps the password)


def absolute(url: str) -> str:
    """A relative SQLite path made absolute, once (as for MLflow's store): a resumed search may run elsewhere."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        return f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
    return url


def with_password(recorded: str) -> str:
    """The URL a resumed search reaches its study at: ``recorded`` (no password), with the password
    of ``$PRUNETUNE_STUDY_STORAGE`` when that names the same database; else as recorded, and the
    database driver reads ``PGPASSWORD`` / ``~/.pgpass``."""
    current = os.environ.get(ENV, "")
    if recorded and current and problem(current) is None and public(current) == public(recorded):
        return current
    return recorded


def url(spec: Spec, exp_dir: Path) -> str:
    """Where the study of the search in ``exp_dir`` is: ``[search] study_storage``, else its ``optuna.db``."""
    return spec.search.study_storage or f"sqlite:///{exp_dir / STUDY_FILE}"


def name(spec: Spec, exp_dir: Path) -> str:
    """The study's name: the spec's in its own ``optuna.db`` (as before: one study per file), the
    experiment directory's in a shared database (unique per search)."""
    return exp_dir.name if spec.search.study_storage else spec.name


def connect(storage_url: str) -> Storage:
    """Optuna's storage at ``storage_url`` (its tables created on first use), or a :class:`StudyError`
    naming the database without its password and the fix."""
    try:
        return Storage(storage_url)
    except ImportError as e:  # Optuna's, from the driver's: name the module that is missing
        raise StudyError(f"the Optuna study's database {public(storage_url)} needs a driver that is not installed "
                         f"({e.__cause__ or e}); install it, or use postgresql:// (psycopg comes with "
                         "prunetune)") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as e:  # RuntimeError: Optuna's schema version check
        reason = " ".join(str(getattr(e, "orig", None) or e).split())
        password = _password(storage_url)
        if password:
            reason = reason.replace(password, "***")
        raise StudyError(f"the Optuna study's database {public(storage_url)} cannot be used: {reason[:300]}; start "
                         f"it or fix the URL and its password ([search] study_storage, {ENV}, PGPASSWORD)") from None


def check(spec: Spec) -> None:
    """Connect once to ``[search] study_storage`` (nothing to do for the SQLite file, or a grid search,
    which has no study): an unreachable database or a wrong password stops the search before any training."""
    if spec.search.study_storage and spec.search.sampler != "grid":
        connect(spec.search.study_storage).engine.dispose()


def _password(storage_url: str) -> str | None:
    return make_url(storage_url).password


def _engine_kwargs(storage_url: str) -> dict[str, Any]:
    """A search holds its connection for hours: test it before use (a database restarted meanwhile);
    PostgreSQL gives up connecting after :data:`_CONNECT_TIMEOUT_S`."""
    backend = make_url(storage_url).get_backend_name()
    if backend == "sqlite":
        return {}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT_S}
    return kwargs


class Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that pickles its URL without the password (Tune saves the searcher, this
    storage in it, in the experiment directory) and, unpickled, takes the password from the
    environment again (:func:`with_password`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, engine_kwargs=_engine_kwargs(url))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["url"] = public(state["url"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "url": with_password(state["url"])})
