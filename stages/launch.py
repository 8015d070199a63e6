"""Start a stage under torchrun with `<section>.nproc_per_node` processes (gpu = all visible GPUs, 1 on CPU).

    python -m stages.launch train stages.train
"""

import os
import subprocess
import sys

import torch

from pgolf.config import load_params
from pgolf.errors import PgolfError


def resolve_nproc(value: str, key: str, visible_gpus: int) -> int:
    if value == "gpu":
        return max(visible_gpus, 1)
    try:
        n = int(value)
    except ValueError:
        raise PgolfError(f"{key}: {value!r}; expected 'gpu' or a positive number of processes") from None
    if n < 1:
        raise PgolfError(f"{key}: {n}; expected at least 1 process")
    if visible_gpus and n > visible_gpus:
        raise PgolfError(f"{key}: {n} processes but only {visible_gpus} GPU(s) are visible")
    return n


def main() -> int:
    section, module = sys.argv[1], sys.argv[2]
    try:
        params = load_params()
        key = f"{section}.nproc_per_node"
        nproc = resolve_nproc(getattr(params, section).nproc_per_node, key, torch.cuda.device_count())
    except PgolfError as e:
        print(f"error: {section}: {e}", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", "-m", module]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    result = subprocess.run(cmd, env=env)
    if result.returncode:
        print(f"error: {section}: torchrun exited with status {result.returncode} (a rank failed; see above)",
              file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
