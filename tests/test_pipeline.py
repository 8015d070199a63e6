"""The real pipeline through real DVC, in a temporary git repository."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from conftest import FAST_PIPELINE, ROOT, pipeline_repo, read_metrics, run

from pgolf.data import read_shard, shard_paths
from pgolf.io import sha256_file

TRAIN_SKIPPED = ("Stage 'train' didn't change, skipping", "Stage 'train' is cached - skipping run")


def test_dvc_repro_tokenize(tmp_path):
    repo = pipeline_repo(tmp_path, {})
    run(["dvc", "repro", "tokenize"], repo)
    out = repo / "artifacts" / "tokenize" / "data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 1024 and manifest["tokenizer"]["sha256"] == sha256_file(out / "tokenizer.model")
    for split in ("train", "val"):
        shards = shard_paths(out, split)
        assert [s["file"] for s in manifest["splits"][split]["shards"]] == [p.name for p in shards]
        assert sum(read_shard(p, 1024).size for p in shards) == manifest["splits"][split]["tokens"]
        assert all(sha256_file(p) == s["sha256"] for p, s in zip(shards, manifest["splits"][split]["shards"]))
    assert read_metrics(repo, "tokenize")["val_docs"] == 16
    assert "changed" not in run(["dvc", "status", "tokenize"], repo).stdout


def exp_rows(repo) -> dict:
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    found = {}
    for base in show:
        for exp in base.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = rev["data"]["metrics"]["artifacts/eval/metrics.json"]["data"]
                found[rev["name"]] = (rev["data"]["params"]["params.yaml"]["data"], metrics)
    return found


def test_whole_pipeline_fits_the_budget_then_experiments_rerun_only_what_changed(tmp_path):
    # a limit below the demo's natural size (~322 kB) and a 20 s training budget the cap is set to
    budget = {"audit": {"limit_bytes": 270_000, "train_budget_s": 20},
              "train": FAST_PIPELINE["train"] | {"iterations": 10**6, "max_seconds": 20, "calibration_reserve_s": 2}}
    repo = pipeline_repo(tmp_path, FAST_PIPELINE | budget)
    out = run(["dvc", "repro"], repo).stdout
    assert "audit passed" in out and "val_bpb " in out
    audit = json.loads((repo / "artifacts" / "audit" / "audit.json").read_text())
    assert audit["passed"] and audit["total_bytes"] == audit["code_bytes"] + audit["model_bytes"] <= 270_000
    assert audit["train_seconds_counted"] <= 20 < audit["train_seconds"] + 2.5
    q = read_metrics(repo, "quantize")
    assert q["unfitted_bytes_est"] > q["target_bytes"] >= q["fitted_bytes"] == audit["model_bytes"] and q["clip_offset"] > 0
    assert audit["code_bytes"] == (repo / "artifacts" / "export" / "train_gpt.py").stat().st_size
    base = read_metrics(repo, "eval")
    assert base["quant_gap"] == round(base["val_bpb_plain"] - read_metrics(repo, "ema")["prequant_val_bpb"], 6)
    for stage in ("audit", "export"):  # they use no registry: no torch import (seconds of every exp run on a GPU host)
        imported = run([sys.executable, "-X", "importtime", "-m", f"stages.{stage}"], repo).stderr
        assert re.search(r"\|\s+pgolf\.config$", imported, re.M) and not re.search(r"\|\s+torch$", imported, re.M)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    kept = [repo / "artifacts/train/model/ema.safetensors", repo / "artifacts/ema/model.safetensors",
            repo / "artifacts/calibrate/hessians.safetensors"]
    before = [sha256_file(p) for p in kept]
    stamps = [p.stat().st_mtime_ns for p in kept]

    log = run(["dvc", "exp", "run", "-n", "rtn", "-S", "quant.method=rtn"], repo).stdout
    for stage in ("tokenize", "train", "ema", "calibrate"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    for stage in ("quantize", "compress", "eval", "audit", "export"):
        assert f"Running stage '{stage}'" in log, log
    assert [sha256_file(p) for p in kept] == before and [p.stat().st_mtime_ns for p in kept] == stamps

    log = run(["dvc", "exp", "run", "-n", "sliding", "-S", "eval.stride=32"], repo).stdout
    for stage in ("tokenize", "train", "ema", "calibrate", "quantize", "compress"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    assert "Running stage 'eval'" in log and "Running stage 'audit'" in log

    rows = exp_rows(repo)
    assert rows["rtn"][0]["quant"]["method"] == "rtn" and rows["rtn"][1]["val_bpb"] != base["val_bpb"]
    assert rows["sliding"][0]["eval"]["stride"] == 32 and rows["sliding"][1]["val_bpb"] != rows["rtn"][1]["val_bpb"]

    # an experiment in a temporary workspace restores the trained model from the cache instead of training
    log = run(["dvc", "exp", "run", "--temp", "-n", "tmp-sd", "-S", "quant.method=sdclip"], repo).stdout
    assert any(s in log for s in TRAIN_SKIPPED), log
    # ... and so does a queued one (run by DVC's queue worker in a workspace of its own); one of two fails
    run(["dvc", "exp", "run", "--queue", "-n", "queued-cs", "-S", "quant.method=clip_search"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "broken", "-S", "audit.limit_bytes=1000"], repo)
    run(["dvc", "queue", "start"], repo)
    deadline = time.time() + 600
    while time.time() < deadline and "Queued" in (status := run(["dvc", "queue", "status"], repo).stdout) \
            or "Running" in status:
        time.sleep(2)
    assert "Success" in status and "Failed" in status, status
    log = run(["dvc", "queue", "logs", "queued-cs"], repo).stdout
    assert any(s in log for s in TRAIN_SKIPPED) and "Running stage 'quantize'" in log, log
    assert "audit.limit_bytes: 1,000 leaves no room for the model" in run(["dvc", "queue", "logs", "broken"], repo).stdout
    run(["dvc", "queue", "stop"], repo, check=False)

    # the failed experiment is shown failed; the rest sorted by bpb with their headroom to the limit
    table = run(["pgolf", "compare"], repo).stdout
    lines = [line for line in table.splitlines() if line.startswith("| ") and "experiment" not in line]
    names = [line.split("|")[1].strip() for line in lines]
    assert {"rtn", "sliding", "tmp-sd", "queued-cs"} <= set(names), table
    bpbs = [float(line.split("|")[2]) for line in lines if "FAILED" not in line]
    assert bpbs == sorted(bpbs)
    assert "FAILED" in table.splitlines()[-1] and "broken" in table.splitlines()[-1]

    # pgolf plots: three PNGs; the quant-only experiments' loss, read at their revisions, is the baseline's training
    run(["pgolf", "plots", "--out", "figs"], repo)
    for name in ("train_loss.png", "bpb_vs_total_bytes.png", "quant_gap.png"):
        assert (repo / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pgolf import compare, plots

    curves = plots.loss_curves(compare.rows(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)), str(repo))
    baseline = np.loadtxt(repo / plots.LOSS_PATH, skiprows=1)
    assert {"rtn", "sliding", "tmp-sd"} <= set(curves) and all(np.array_equal(curves[n], baseline) for n in curves)

    # the README's `dvc exp show`: the score first, six decimals, only the columns that matter
    import csv

    show = readme_command("dvc exp show")
    out = subprocess.run(show, shell=True, cwd=repo, capture_output=True, text=True, env=shell_env()).stdout
    table = list(csv.DictReader(out.splitlines()))
    assert list(table[0])[:3] == ["Experiment", "val_bpb", "total_bytes"] and "quant.lqer_rank" in table[0], out
    rtn = next(r for r in table if r["Experiment"] == "rtn")
    assert float(rtn["val_bpb"]) == rows["rtn"][1]["val_bpb"], out  # the metric as eval wrote it (6 decimals) ...
    assert any(re.fullmatch(r"\d\.\d{6}", r["val_bpb"]) for r in table), out  # ... not DVC's 5 significant digits

    # plots: the loss once, val bpb over steps, bpb against total bytes with the limit drawn
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert sorted(plots) == ["bpb_vs_total_bytes", "train_loss", "val_bpb"], list(plots)
    spec = json.dumps(plots["bpb_vs_total_bytes"])
    assert "16000000" in spec and "total_bytes" in spec
    loss = np.loadtxt(repo / "artifacts/train/plots/loss.tsv", skiprows=1)
    assert loss.shape[0] >= 3 and (np.diff(loss[:, 0]) > 0).all()


def readme_command(prefix: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return next(line for line in readme.splitlines() if line.startswith(prefix)).split("  #")[0]


def shell_env(**extra) -> dict:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **extra}


def test_train_restores_from_the_run_cache_and_every_stage_checks_the_whole_params_file(tmp_path):
    """The attack's table: `rm -rf artifacts/train/model && dvc repro train` retrained (outputs with cache: false turn
    DVC's run cache off), and a misspelled section went unnoticed by `dvc repro train` (the check stage was upstream
    of nothing)."""
    import shutil

    import yaml

    repo = pipeline_repo(tmp_path, FAST_PIPELINE)
    run(["dvc", "repro", "train"], repo)
    model = repo / "artifacts" / "train" / "model" / "ema.safetensors"
    before = sha256_file(model)
    shutil.rmtree(model.parent)
    out = run(["dvc", "repro", "train"], repo).stdout
    assert "Stage 'train' is cached - skipping run" in out and "step " not in out, out
    assert sha256_file(model) == before
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["stride"] = 64  # valid, and no business of train's
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(["dvc", "repro", "train"], repo).stdout
    assert "Stage 'train' didn't change, skipping" in out
    (repo / "params.yaml").write_text(yaml.safe_dump(params | {"evla": {"stride": 64}}))
    p = run(["dvc", "repro", "train"], repo, check=False)
    assert p.returncode != 0 and "error: check: params.yaml: unknown param 'evla'; did you mean 'eval'?" in p.stderr
