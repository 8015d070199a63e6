"""Start a stage's ranks: torchrun's environment contract without torchrun's supervisor.

The launching process checks params and inputs first, runs the stage itself when one process is
enough, and otherwise starts the ranks in its own process group (so Ctrl-C and a kill of the group
reach them). When a rank fails, the others are stopped and its one-line error is printed once.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import PgolfError

WORKER_ENV = "PGOLF_ERRORS"  # set in ranks started here: the folder a failing rank writes its error line to
GRACE_S = 10.0  # how long stopped ranks get to exit before they are killed


def ignore_signals() -> None:
    """From here on SIGINT and SIGTERM are ignored: a second signal during the cleanup an interrupt starts would
    otherwise end in an `Exception ignored ... KeyboardInterrupt` traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interrupt_once(signum, frame) -> None:
    """SIGTERM as Ctrl-C: KeyboardInterrupt, once."""
    ignore_signals()
    raise KeyboardInterrupt


def caused_by_interrupt(exc: BaseException) -> bool:
    """A KeyboardInterrupt, or an error it led to: a signal that lands while an extension module initializes
    (sentencepiece, torch) surfaces as `ImportError: initialization failed`, chained to the interrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def resolve_nproc(value: str, key: str, visible_gpus: int) -> int:
    """`gpu` = every visible GPU (one process without any), or a count no larger than the GPUs visible."""
    if value == "gpu":
        return max(visible_gpus, 1)
    n = int(value)
    if visible_gpus and n > visible_gpus:
        raise PgolfError(f"{key}: {n} processes but only {visible_gpus} GPU(s) are visible")
    return n


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies, so a killed `dvc repro` or launcher leaves no rank behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _parent_pid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def _parent_is_shell_wrapper() -> bool:
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    return len(argv) >= 3 and argv[-2] == b"-c"


def die_with_dvc() -> None:
    """die_with_parent, and under dvc also die with dvc: dvc runs a stage as `$SHELL -c cmd`, and a shell that
    forks instead of exec'ing (dash, the usual /bin/sh) outlives a killed dvc, so its parent is watched too."""
    die_with_parent()
    if not (sys.platform.startswith("linux") and "DVC_STAGE" in os.environ and _parent_is_shell_wrapper()):
        return
    shell = os.getppid()
    dvc = _parent_pid_of(shell)

    def watch() -> None:
        while _parent_pid_of(shell) == dvc:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="pgolf-watch-dvc", daemon=True).start()


def _rank_preexec() -> None:
    """In a rank, before exec: ignore SIGINT (a Ctrl-C reaches the whole process group; the launcher stops the
    ranks with SIGTERM instead, even mid-import: an ignored SIGINT stays ignored in Python) and die with the
    launcher from the first instruction on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def report_error(line: str) -> None:
    """In a rank started here: leave the error for the launcher; elsewhere print it."""
    folder = os.environ.get(WORKER_ENV)
    if folder:
        (Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt").write_text(line)
    else:
        print(line, file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _describe(rank: int, code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"rank {rank} was killed by {name}{hint}"
    return f"rank {rank} exited with status {code}"


def spawn(module: str, nproc: int, name: str) -> int:
    """Run `python -m module` as ranks 0..nproc-1; returns the stage's exit status."""
    errors = tempfile.mkdtemp(prefix=f"pgolf-{name}-")
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base = {**os.environ, WORKER_ENV: errors, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": threads}
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen] = []
    try:
        for r in range(nproc):
            if not interrupted:
                procs.append(subprocess.Popen([sys.executable, "-m", module], preexec_fn=_rank_preexec,
                                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}))
        while not interrupted and any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    finally:
        _stop(procs)  # on every way out: no rank outlives its launcher
        for s, handler in previous.items():
            signal.signal(s, handler)
    lines = []
    for r in range(nproc):
        path = Path(errors) / f"rank{r}.txt"
        if path.exists() and path.read_text() not in lines:
            lines.append(path.read_text())
    for path in Path(errors).iterdir():
        path.unlink()
    os.rmdir(errors)
    if interrupted:
        print(f"error: {name}: interrupted", file=sys.stderr)
        return 130
    if not failed:
        return 0
    for line in lines or [f"error: {name}: {_describe(*failed[0])}"]:
        print(line, file=sys.stderr)
    return 1
