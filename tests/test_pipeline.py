"""The real pipeline through real DVC, in a temporary git repository."""

import json

import numpy as np

from conftest import FAST_PIPELINE, pipeline_repo, read_metrics, run
from pgolf.data import read_shard, shard_paths
from pgolf.io import sha256_file


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


def test_whole_pipeline_then_experiments_rerun_only_what_changed(tmp_path):
    repo = pipeline_repo(tmp_path, FAST_PIPELINE)
    out = run(["dvc", "repro"], repo).stdout
    assert "audit: passed" in out
    audit = json.loads((repo / "artifacts" / "audit" / "audit.json").read_text())
    assert audit["passed"] and audit["total_bytes"] == audit["code_bytes"] + audit["model_bytes"] < 16_000_000
    base = read_metrics(repo, "eval")
    assert base["quant_gap"] == round(base["val_bpb_plain"] - read_metrics(repo, "ema")["prequant_val_bpb"], 6)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    kept = [repo / "artifacts/train/model/ema.safetensors", repo / "artifacts/ema/model.safetensors",
            repo / "artifacts/calibrate/hessians.safetensors"]
    before = [sha256_file(p) for p in kept]
    stamps = [p.stat().st_mtime_ns for p in kept]

    log = run(["dvc", "exp", "run", "-n", "rtn", "-S", "quant.method=rtn"], repo).stdout
    for stage in ("tokenize", "train", "ema", "calibrate"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    for stage in ("quantize", "compress", "eval", "audit"):
        assert f"Running stage '{stage}'" in log, log
    assert [sha256_file(p) for p in kept] == before and [p.stat().st_mtime_ns for p in kept] == stamps

    log = run(["dvc", "exp", "run", "-n", "sliding", "-S", "eval.stride=32"], repo).stdout
    for stage in ("tokenize", "train", "ema", "calibrate", "quantize", "compress"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    assert "Running stage 'eval'" in log and "Running stage 'audit'" in log

    rows = exp_rows(repo)
    assert rows["rtn"][0]["quant"]["method"] == "rtn" and rows["rtn"][1]["val_bpb"] != base["val_bpb"]
    assert rows["sliding"][0]["eval"]["stride"] == 32 and rows["sliding"][1]["val_bpb"] != rows["rtn"][1]["val_bpb"]
    assert rows["sliding"][1]["tokens"] == rows["rtn"][1]["tokens"]  # same targets, more context

    table = run(["python", "-m", "pgolf.compare"], repo).stdout
    assert table.count("\n") >= 4 and "| rtn | rtn |" in table and "| sliding | rtn |" in table
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert '"loss"' in plots and '"bpb_vs_bytes"' in plots
    loss = np.loadtxt(repo / "artifacts/train/live/plots/metrics/train_loss.tsv", skiprows=1)
    assert loss.shape[0] >= 3 and loss[-1, 0] == FAST_PIPELINE["train"]["iterations"]
