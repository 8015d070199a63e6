"""What the quantizer benchmarks share: their command line (`--key=value` options, then `name:key=value,...`
points that override quant params) and their output (the JSON rewritten after every point, one Markdown table)."""

import json
from pathlib import Path


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, dict]]]:
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    points = []
    for point in (a for a in argv if not a.startswith("--")):
        name, _, sets = point.partition(":")
        values = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in filter(None, sets.split(",")))}
        points.append((name, values))
    return options, points


def save(out: Path, record: dict, rows: list[dict]) -> None:
    """After every point, so that a run cut off keeps what it did."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "rows": rows}, indent=1))


def print_table(rows: list[dict], columns: dict[str, str]) -> None:
    """columns: header -> format string over a row, e.g. {"model bytes": "{model_bytes:,}"}."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(f.format(**r) for f in columns.values()) + " |")
