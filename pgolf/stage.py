"""What every stage script shares: one-line failures, interrupts, metrics, and starting several ranks."""

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import launch, paths
from .errors import PgolfError
from .io import refuse_links, write_json


def _writable(folder: Path) -> None:
    refuse_links(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PgolfError(f"{folder}: not writable; the stage writes its outputs there")


def run(main: Callable[[], dict | None], name: str) -> None:
    """Run a stage body: a PgolfError (or a failed write: disk full, permissions) ends it with one line and
    status 1, SIGINT/SIGTERM with one line and status 130; the metrics it returns are written to
    artifacts/<name>/metrics.json."""
    launch.die_with_dvc()
    signal.signal(signal.SIGTERM, launch.interrupt_once)
    t0 = time.perf_counter()
    try:
        _writable(paths.ARTIFACTS / name)  # before the work, not after it
        metrics = main()
        if metrics is not None:
            metrics.setdefault("stage_seconds", round(time.perf_counter() - t0, 3))
            write_json(paths.metrics(name), metrics)
    except PgolfError as e:
        launch.report_error(f"error: {name}: {e}")
        sys.exit(1)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        launch.report_error(f"error: {name}: {where}{e.strerror or e}")
        sys.exit(1)
    except (KeyboardInterrupt, Exception) as e:
        if not launch.caused_by_interrupt(e):
            raise
        launch.ignore_signals()  # Ctrl-C began it (SIGTERM's handler ignores them already)
        if not launch.is_worker():  # the launcher reports the interrupt once for all ranks
            print(f"error: {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        dist = sys.modules.get("torch.distributed")  # leave a process group cleanly, if one was joined
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(main: Callable[[], dict | None], name: str, nproc: Callable[[], str],
              check: Callable[[], None] | None = None) -> None:
    """A stage that runs on `nproc()` processes (`gpu` or a count). The launching process checks params and
    inputs (`check`) before any rank starts; one process runs `main` itself, more are started as ranks."""
    if launch.is_worker():
        return run(main, name)

    def launcher() -> dict | None:
        import torch

        n = launch.resolve_nproc(nproc(), f"{name}.nproc_per_node", torch.cuda.device_count())
        if check is not None:
            check()
        if n == 1:
            return main()
        status = launch.spawn(sys.modules["__main__"].__spec__.name, n, name)
        if status:
            sys.exit(status)  # the ranks' errors are printed already
        return None

    run(launcher, name)
