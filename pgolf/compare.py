"""A table of DVC experiments: bpb, bytes, headroom to the limit and audit, sorted by bpb; failures marked."""

import json
import subprocess
from collections.abc import Iterator

from .errors import PgolfError


def _revs(show: list[dict]) -> Iterator[dict]:
    for baseline in show:
        yield baseline
        for exp in baseline.get("experiments") or []:
            yield from exp.get("revs", [])


def _metrics(data: dict) -> dict[str, dict]:
    return {path.split("/")[-2]: (m.get("data") or {}) for path, m in (data.get("metrics") or {}).items()}


def rows(show: list[dict]) -> list[dict]:
    """One row per experiment (and the baseline); a failed one keeps its error and no numbers."""
    out = []
    for rev in _revs(show):
        data = rev.get("data") or {}
        name = rev.get("name") or data.get("name") or data.get("rev") or rev.get("rev")
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        quant = params.get("quant", {})
        bits = quant.get("bits", {})
        row = {"name": name, "rev": rev.get("rev") or data.get("rev"), "method": quant.get("method"),
               "lqer": quant.get("lqer_rank"), "bits": "/".join(str(bits.get(g, "?")) for g in ("attn", "mlp", "embed", "other")),
               "error": None}
        error = rev.get("error") or data.get("error")
        if error:
            row["error"] = (error.get("msg") or error.get("type") or "failed") if isinstance(error, dict) else str(error)
            out.append(row)
            continue
        metrics = _metrics(data)
        ev, audit = metrics.get("eval", {}), metrics.get("audit", {})
        if "val_bpb" not in ev:
            continue
        if audit.get("passed") is False:
            row["error"] = "audit failed"
        out.append(row | {"val_bpb": ev["val_bpb"], "quant_gap": ev.get("quant_gap"),
                          "total_bytes": audit.get("total_bytes"), "headroom": audit.get("headroom"),
                          "passed": audit.get("passed")})
    seen, unique = set(), []
    for r in sorted(out, key=lambda r: (r["error"] is not None, r.get("val_bpb", 0.0), str(r["name"]))):
        key = (r["name"], r.get("val_bpb"), r.get("total_bytes"))
        if key not in seen:  # the workspace can repeat the last experiment
            seen.add(key)
            unique.append(r)
    return unique


COLUMNS = ("experiment", "val_bpb", "quant_gap", "total bytes", "headroom", "method", "bits a/m/e/o", "lqer", "audit")


def _cells(r: dict) -> list[str]:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    if r["error"] and "val_bpb" not in r:
        return [str(r["name"]), "-", "-", "-", "-", str(r["method"]), r["bits"], fmt(r["lqer"], "d"),
                f"FAILED: {r['error']}"]
    audit = "pass" if r.get("passed") else "FAILED" if r.get("passed") is False else "-"
    return [str(r["name"]), f"{r['val_bpb']:.5f}", fmt(r["quant_gap"], "+.5f"), fmt(r["total_bytes"], ","),
            fmt(r["headroom"], ","), str(r["method"]), r["bits"], fmt(r["lqer"], "d"), audit]


def markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in table]
    return "\n".join(lines)


def plain(table: list[dict]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def load_show(path: str | None) -> list[dict]:
    """`dvc exp show --json` of this repo, or its saved output."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                show = json.load(f)
        except FileNotFoundError:
            raise PgolfError(f"{path}: file not found (save one with `dvc exp show --json > {path}`)") from None
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
            raise PgolfError(f"{path}: not the JSON `dvc exp show --json` writes ({type(e).__name__})") from None
        where = path
    else:
        try:
            p = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        except FileNotFoundError:
            raise PgolfError("dvc is not on PATH (activate the environment pgolf is installed in)") from None
        if p.returncode:
            last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"status {p.returncode}"
            raise PgolfError(f"dvc exp show failed: {last}")
        show, where = json.loads(p.stdout), "dvc exp show --json"
    if not isinstance(show, list) or not all(isinstance(rev, dict) for rev in show):
        raise PgolfError(f"{where}: not the JSON `dvc exp show --json` writes (expected a list of revisions)")
    return show
