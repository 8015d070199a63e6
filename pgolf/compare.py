"""A markdown table of DVC experiments: method, bits, bpb, gap, bytes, audit, sorted by bpb.

    python -m pgolf.compare            # runs `dvc exp show --json` here
    python -m pgolf.compare exps.json  # or reads its saved output
"""

import json
import subprocess
import sys
from collections.abc import Iterator


def _revs(show: list[dict]) -> Iterator[dict]:
    for baseline in show:
        yield baseline
        for exp in baseline.get("experiments") or []:
            yield from exp.get("revs", [])


def rows(show: list[dict]) -> list[dict]:
    out = []
    for rev in _revs(show):
        data = rev.get("data") or {}
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = {path.split("/")[-2]: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
        ev = metrics.get("eval", {})
        if "val_bpb" not in ev:
            continue
        quant, compress = params.get("quant", {}), metrics.get("compress", {})
        bits = quant.get("bits", {})
        out.append({
            "name": rev.get("name") or data.get("rev") or rev.get("rev"),
            "method": quant.get("method"),
            "bits": "/".join(str(bits.get(g, "?")) for g in ("attn", "mlp", "embed", "other")),
            "val_bpb": ev["val_bpb"], "quant_gap": ev.get("quant_gap"),
            "model_bytes": compress.get("blob_bytes"), "total_bytes": metrics.get("audit", {}).get("total_bytes"),
            "passed": metrics.get("audit", {}).get("passed"),
            "quantize_s": metrics.get("quantize", {}).get("seconds"),
        })
    seen, unique = set(), []
    for r in sorted(out, key=lambda r: (r["val_bpb"], str(r["name"]))):
        key = (r["method"], r["bits"], r["val_bpb"], r["model_bytes"])
        if key not in seen:  # the workspace repeats the last experiment
            seen.add(key)
            unique.append(r)
    return unique


def markdown(table: list[dict]) -> str:
    lines = ["| experiment | method | bits attn/mlp/embed/other | val_bpb | quant_gap | model bytes | total bytes | audit | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        audit = {True: "pass", False: "FAIL", None: "-"}[r["passed"]]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['name']} | {r['method']} | {r['bits']} | {r['val_bpb']:.5f} | {fmt(r['quant_gap'], '+.5f')} | "
                     f"{fmt(r['model_bytes'], ',')} | {fmt(r['total_bytes'], ',')} | {audit} | {fmt(r['quantize_s'], '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1:
        show = json.load(open(sys.argv[1]))
    else:
        p = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"error: dvc exp show failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        show = json.loads(p.stdout)
    print(markdown(rows(show)))


if __name__ == "__main__":
    main()
