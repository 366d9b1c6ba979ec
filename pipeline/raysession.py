"""Joining or starting Ray, and leaving it as it was found."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import ray


# Ray's cluster token; with token authentication on it is what stands between the local Ray's
# ports (which listen on every interface) and anyone on the network. ray.init writes it in the
# driver with a plain open(), so with the usual umask it is world-readable until chmod-ed.
RAY_TOKEN = Path.home() / ".ray" / "auth_token"


def owner_only(path: Path) -> None:
    """Make ``path`` readable by its owner alone, if it exists and others can read it."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)


def private_dir(path: Path) -> None:
    """Make ``path`` a directory only its owner can enter: created 0o700 if missing, else with
    the group's and others' permissions taken away (never given). A file created in it is then
    out of others' reach from its first byte, whatever its own mode.

    This rather than a umask around ``ray.init``: the processes Ray starts there (GCS, raylet and,
    through the raylet, every worker) would keep that umask for the whole session, and make the
    run's outputs written by workers owner-only too.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & 0o077:
            with contextlib.suppress(PermissionError):  # not ours (a link elsewhere): left as it is
                os.chmod(path, mode & 0o700)
    except OSError:
        pass  # no home to write in: Ray reports it if it needs the directory (token authentication)


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray, join ``address`` ("auto" or host:port), or start a local Ray.

    A Ray started here is stopped on exit; one that was already running is left alone.

    Args:
        address: cluster address, or None for a local instance.
        num_cpus: CPUs for a local instance (default: all).
    """
    if ray.is_initialized():
        yield
        return
    # Worker output stays in Ray's session logs (/tmp/ray/session_latest/logs): Ray Train's
    # controller and workers are chatty, and progress and errors reach the driver by other paths.
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    restore: dict[str, str | None] = {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" so that a stale cluster address file is not joined by accident.
        mem = int(os.environ.get("DEITPIPE_OBJECT_STORE_BYTES", 512 << 20))
        private_dir(RAY_TOKEN.parent)  # before ray.init writes the token there
        owner_only(RAY_TOKEN)  # one left by an earlier run
        # Without a dashboard a local Ray has no metrics agent, and Ray 2.51-2.53 log an
        # error-level line from every process that cannot reach it: nothing to export, then.
        restore = {NO_METRICS: os.environ.get(NO_METRICS)}
        os.environ.setdefault(NO_METRICS, "0")
        try:
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=mem, **kwargs)
        except BaseException:
            _restore_env(restore)
            raise
        owner_only(RAY_TOKEN)
    try:
        yield
    finally:
        ray.shutdown()
        _restore_env(restore)


NO_METRICS = "RAY_enable_metrics_collection"


def _restore_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data's driver-side chatter (execution plans, timings, a note that its own progress
    bars are off) at warning level and above only; deitpipe shows its own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    loggers = {name: logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")}
    before = ({name: log.level for name, log in loggers.items()}, ctx.enable_progress_bars,
              ctx.print_on_execution_start)
    loggers["ray.data"].setLevel(logging.WARNING)
    loggers["ray.data._internal.progress"].setLevel(logging.ERROR)  # only "progress bars disabled"
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    try:
        yield
    finally:
        for name, level in before[0].items():
            loggers[name].setLevel(level)
        ctx.enable_progress_bars, ctx.print_on_execution_start = before[1], before[2]
