"""audit: size, time, coverage and legality of the run -> artifacts/audit/audit.json; fails the pipeline if strict.

The code bytes are those of the train_gpt.py the export stage writes for this run (the same function counts them).
"""

import hashlib
import sys

from pgolf import audit, export, paths, stage
from pgolf.config import load_params
from pgolf.errors import PgolfError
from pgolf.io import read_json, sha256_file, write_json


def fields(path, keys: tuple[str, ...]) -> dict:
    """The JSON at `path`, which must hold `keys` (one line naming the first missing one)."""
    data = read_json(path)
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise PgolfError(f"{path}: no '{missing[0]}' (written by an older or interrupted stage; rerun it)")
    return data


def main() -> dict:
    params = load_params(choices=False)
    m = {"train": fields(paths.metrics("train"), ("train_seconds",)),
         "calibrate": fields(paths.metrics("calibrate"), ("seconds", "reads_training_data")),
         "eval": fields(paths.metrics("eval"), ("eval_seconds", "val_bpb"))}
    run = fields(paths.TRAIN_RUN, ("gpu", "gpu_count"))
    ev = fields(paths.EVAL_EVIDENCE, ("gpu", "gpu_count", "targets", "targets_expected", "bytes", "bytes_expected",
                                      "val_tokens_trained_before_scored", "ttt", "inputs", "blob_sha256", "val_sha256"))
    split = fields(paths.TOKENIZED / "manifest.json", ("splits",))["splits"]["val"]
    code = export.script(params)
    evidence = audit.Evidence(
        code_bytes=len(code), model_bytes=paths.BLOB.stat().st_size,
        train_seconds=m["train"]["train_seconds"], calibration_seconds=m["calibrate"]["seconds"],
        calibration_reads_training_data=m["calibrate"]["reads_training_data"], eval_seconds=m["eval"]["eval_seconds"],
        train_hardware=audit.hardware(run["gpu"], run["gpu_count"]), eval_hardware=audit.hardware(ev["gpu"], ev["gpu_count"]),
        val_bpb=m["eval"]["val_bpb"], targets=ev["targets"], targets_expected=ev["targets_expected"],
        bytes=ev["bytes"], bytes_expected=ev["bytes_expected"],
        val_tokens_trained_before_scored=ev["val_tokens_trained_before_scored"], ttt=ev["ttt"], eval_inputs=ev["inputs"],
        blob_sha256=sha256_file(paths.BLOB), scored_blob_sha256=ev["blob_sha256"],
        split_sha256=split.get("sha256_tokens", ""), scored_split_sha256=ev["val_sha256"],
        val_docs_in_train=split.get("docs_in_train"), data_source=params.data.source,
        val_docs=None if params.data.source == "fineweb" else params.data.val_docs)
    report = audit.check(evidence, params.audit) | {"code_sha256": hashlib.sha256(code).hexdigest()}
    write_json(paths.AUDIT, report)
    write_json(paths.POINT, [{"total_bytes": report["total_bytes"], "val_bpb": report["val_bpb"]}])
    for line in report["failures"]:
        print(f"audit: FAIL {line}", file=sys.stderr)
    for line in report["notes"]:
        print(f"audit: note {line}")
    print(audit.summary(report))
    if params.audit.strict and not report["passed"]:
        sys.exit(1)
    return {"total_bytes": report["total_bytes"], "headroom": report["headroom_bytes"], "code_bytes": report["code_bytes"],
            "passed": report["passed"], "challenge": report["challenge"]}


if __name__ == "__main__":
    stage.run(main, "audit")
