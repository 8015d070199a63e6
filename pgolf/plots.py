"""PNG plots of the experiments (matplotlib, drawn here: they open anywhere, offline): train loss against step, val_bpb
against total bytes, and the quantizers' bpb gap. Axes fit the data; the 16,000,000-byte limit is drawn only where it
falls inside them."""

import hashlib
import io
from pathlib import Path

import numpy as np

from .compare import rows
from .errors import PgolfError

LIMIT = 16_000_000
LOSS_PATH = "artifacts/train/plots/loss.tsv"


def loss_curves(table: list[dict], repo: str = ".") -> dict[str, np.ndarray]:
    """(steps, 2) train loss of each experiment, read at its revision through DVC (its cache; the workspace for the
    workspace). Experiments without a readable loss are left out."""
    import dvc.api
    from dvc.exceptions import DvcException

    curves = {}
    for r in table:
        if r["error"] is not None:
            continue
        rev = None if r["rev"] in (None, "workspace") else r["rev"]
        try:
            text = dvc.api.read(LOSS_PATH, repo=repo, rev=rev)
        except (DvcException, FileNotFoundError, OSError):
            continue
        data = np.loadtxt(io.StringIO(text), skiprows=1, ndmin=2)
        if data.size:
            curves[str(r["name"])] = data
    return curves


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def loss_figure(curves: dict[str, np.ndarray]):
    """One line per distinct training: experiments that reused one model share its curve and its label."""
    fig, ax = _figure()
    shared: dict[str, list[str]] = {}
    for name, data in curves.items():
        shared.setdefault(hashlib.sha256(data.tobytes()).hexdigest(), []).append(name)
    for names in shared.values():
        data = curves[names[0]]
        ax.plot(data[:, 0], data[:, 1], label=", ".join(names) if len(names) <= 4 else f"{names[0]} and "
                f"{len(names) - 1} more (one training)")
    ax.set(xlabel="step", ylabel="train loss (nats)", title="Train loss")
    ax.grid(alpha=0.3)
    if shared:
        ax.legend(fontsize=8)
    return fig


def _span(values: np.ndarray, floor: float) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * 0.08, floor)
    return lo - pad, hi + pad


def _merged(table: list[dict], *keys: str) -> list[dict]:
    """Finished experiments with the given figures; those with equal figures (the workspace repeats the last
    experiment) as one, named by all."""
    merged: dict[tuple, dict] = {}
    for r in table:
        if r["error"] is None and all(r.get(k) is not None for k in keys):
            key = tuple(r[k] for k in keys) + (r["method"], r["bits"], r["lqer"])
            if key in merged:
                merged[key]["name"] = f"{merged[key]['name']}, {r['name']}"
            else:
                merged[key] = dict(r)
    return list(merged.values())


def bytes_figure(table: list[dict]):
    """val_bpb against total bytes (code + model), one labelled point an experiment."""
    done = _merged(table, "val_bpb", "total_bytes")
    fig, ax = _figure()
    if not done:
        ax.set_title("val_bpb against total bytes: no experiment with both")
        return fig
    x = np.array([r["total_bytes"] for r in done], float)
    y = np.array([r["val_bpb"] for r in done], float)
    ax.scatter(x, y, zorder=3)
    for r, xi, yi in zip(done, x, y):
        ax.annotate(str(r["name"]), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    xlo, xhi = _span(x, floor=max(x.max() * 0.005, 1.0))
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(*_span(y, floor=max(abs(y.max()) * 1e-4, 1e-5)))
    if xlo <= LIMIT <= xhi:
        ax.axvline(LIMIT, color="firebrick", linestyle="--", label="16,000,000-byte limit")
        ax.legend(fontsize=8)
    else:
        ax.text(0.99, 0.02, f"limit {LIMIT:,} bytes: {LIMIT - x.max():,.0f} above the largest", ha="right",
                transform=ax.transAxes, fontsize=8, color="firebrick")
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set(xlabel="total bytes (code + compressed model)", ylabel="val bpb", title="val_bpb against total bytes")
    ax.grid(alpha=0.3)
    return fig


def gap_figure(table: list[dict]):
    """Each experiment's quantization gap (val_bpb after quantization minus before), labelled with its quantizer."""
    done = _merged(table, "quant_gap", "val_bpb")
    fig, ax = _figure(height=max(2.5, 0.45 * len(done) + 1.2))
    if not done:
        ax.set_title("Quantization gap: no experiment has one")
        return fig
    done.sort(key=lambda r: r["quant_gap"])
    labels = [f"{r['name']} ({r['method']}, bits a/m/e/o {r['bits']}" + (f", LQER {r['lqer']}" if r["lqer"] else "")
              + ")" for r in done]
    ax.barh(range(len(done)), [r["quant_gap"] for r in done], color="steelblue")
    ax.set_yticks(range(len(done)), labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="val_bpb gap: quantized minus unquantized", title="Quantization gap")
    ax.grid(axis="x", alpha=0.3)
    return fig


def write(show: list[dict], out: Path, repo: str = ".") -> list[Path]:
    """The three PNGs of `dvc exp show --json`'s experiments into the folder `out`."""
    table = rows(show)
    if not any(r["error"] is None for r in table):
        raise PgolfError("no finished experiment to plot (run `dvc repro` or `dvc exp run` first)")
    figures = {"train_loss.png": loss_figure(loss_curves(table, repo)), "bpb_vs_total_bytes.png": bytes_figure(table),
               "quant_gap.png": gap_figure(table)}
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name)
        paths.append(out / name)
    return paths
