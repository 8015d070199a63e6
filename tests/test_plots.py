"""pgolf plots: axes that fit the data, the byte limit only where it is in range, one curve per training."""

import json

import numpy as np
from conftest import run

from pgolf import plots


def row(name: str, bpb: float, total: int, gap: float = 0.001, method: str = "gptq") -> dict:
    return {"name": name, "rev": None, "method": method, "lqer": 0, "bits": "6/6/8/8", "error": None,
            "val_bpb": bpb, "quant_gap": gap, "total_bytes": total, "headroom": plots.LIMIT - total, "passed": True}


def limit_lines(ax) -> list:
    return [line for line in ax.lines if line.get_xdata()[0] == plots.LIMIT]


def test_the_bytes_axis_fits_small_artifacts_and_draws_the_limit_only_when_near():
    small = plots.bytes_figure([row("a", 1.7901, 296_507), row("b", 1.7900, 308_878)]).axes[0]
    lo, hi = small.get_xlim()
    assert 280_000 < lo < 296_507 and 308_878 < hi < 330_000  # not stretched to 16,000,000
    assert not limit_lines(small)
    assert "15,691,122 above the largest" in " ".join(t.get_text() for t in small.texts)
    near = plots.bytes_figure([row("a", 1.0611, 15_981_916), row("b", 1.0631, 15_994_752)]).axes[0]
    lo, hi = near.get_xlim()
    assert lo < 15_981_916 and plots.LIMIT < hi and len(limit_lines(near)) == 1


def test_equal_points_merge_and_failed_experiments_are_left_out():
    failed = row("broken", 0.0, 0) | {"error": "audit failed"}
    ax = plots.bytes_figure([row("gptq5", 1.79, 296_507), row("workspace", 1.79, 296_507), failed]).axes[0]
    assert [t.get_text() for t in ax.texts if "limit" not in t.get_text()] == ["gptq5, workspace"]
    bars = plots.gap_figure([row("x", 1.79, 1, gap=0.0007), row("y", 1.78, 1, gap=0.0004, method="rtn"), failed])
    labels = [t.get_text() for t in bars.axes[0].get_yticklabels()]
    assert labels == ["y (rtn, bits a/m/e/o 6/6/8/8)", "x (gptq, bits a/m/e/o 6/6/8/8)"]  # smallest gap first


def test_experiments_that_reused_one_training_share_one_curve():
    one = np.array([[1, 6.9], [25, 4.7], [50, 3.2]])
    other = np.array([[1, 6.9], [25, 4.6], [50, 3.0]])
    ax = plots.loss_figure({"main": one, "rtn": one.copy(), "lr2": other}).axes[0]
    assert sorted(line.get_label() for line in ax.lines) == ["lr2", "main, rtn"]
    assert np.array_equal(ax.lines[0].get_ydata(), one[:, 1])


def test_plots_without_a_finished_experiment_or_into_a_foreign_folder_is_one_line(tmp_path):
    show = [{"rev": "workspace", "name": None, "error": {"type": "x", "msg": "stage failed"}, "data": {}}]
    (tmp_path / "show.json").write_text(json.dumps(show))
    p = run(["pgolf", "plots", "show.json", "--out", "figs"], tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip() == \
        "error: pgolf plots: no finished experiment to plot (run `dvc repro` or `dvc exp run` first)"
    assert not (tmp_path / "figs").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    p = run(["pgolf", "plots", "show.json", "--out", "mine"], tmp_path, check=False)
    assert p.returncode == 1 and "mine: a folder pgolf did not write as plots output" in p.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
