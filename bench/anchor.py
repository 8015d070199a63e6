"""An anchor's own script (upstream's train_gpt.py, a record's), run unmodified in a session of its own and logged."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


def run_anchor(script: Path, env: dict[str, str], log: Path, timeout_s: float,
               stop_at: Callable[[str], bool]) -> tuple[str, int, float]:
    """Runs `script` with `env` added, in log's folder; each output line goes to `log` with the seconds since start.
    Stopped at the first line `stop_at` accepts, or after `timeout_s`. Returns (output, return code, seconds)."""
    t0 = time.perf_counter()
    # a session of its own: stopping it stops its inductor compile workers too, which could otherwise go on compiling
    # beside pgolf's side (call 63 cut the record inside a compile; pgolf's steps then slowed from 237 to 299 ms)
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=log.parent,
                            start_new_session=True)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    timer = threading.Timer(timeout_s, stop)
    timer.start()
    lines = []
    with open(log, "w") as f:
        for line in proc.stdout:
            lines.append(line)
            f.write(f"[{time.perf_counter() - t0:7.1f}s] {line}")
            f.flush()
            if stop_at(line):
                stop()
    proc.wait()
    timer.cancel()
    out = "".join(lines)
    if proc.returncode and proc.returncode not in (-9, -2):
        print(f"{script.name} failed ({proc.returncode}); its log: {log}\n{out[-3000:]}", flush=True)
    return out, proc.returncode, time.perf_counter() - t0
