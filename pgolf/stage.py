"""What every stage script shares: params, one-line failures, metrics."""

import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import PgolfError
from .io import write_json

ARTIFACTS = Path("artifacts")
TOKENIZED = ARTIFACTS / "tokenize" / "data"  # shards, tokenizer.model, manifest.json


def run(main: Callable[[], dict | None], name: str) -> None:
    """Run a stage body; a PgolfError ends it with one line on stderr and exit status 1."""
    t0 = time.perf_counter()
    try:
        metrics = main()
    except PgolfError as e:
        print(f"error: {name}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        dist = sys.modules.get("torch.distributed")  # leave a torchrun group cleanly, if one was joined
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None:
        metrics.setdefault("stage_seconds", round(time.perf_counter() - t0, 3))
        write_json(ARTIFACTS / name / "metrics.json", metrics)
