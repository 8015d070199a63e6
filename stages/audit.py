"""audit: size, time, coverage and legality of the run -> artifacts/audit/audit.json; fails the pipeline if strict.

The code bytes are those of the train_gpt.py the export stage writes for this run (the same function counts them).
"""

import sys

from pgolf import audit, export, paths, stage
from pgolf.config import load_params
from pgolf.io import read_json, write_json


def main() -> dict:
    params = load_params(choices=False)
    m = {s: read_json(paths.metrics(s)) for s in ("train", "calibrate", "eval")}
    run, ev = read_json(paths.TRAIN_RUN), read_json(paths.EVAL_EVIDENCE)
    evidence = audit.Evidence(
        code_bytes=export.script_bytes(params), model_bytes=paths.BLOB.stat().st_size,
        train_seconds=m["train"]["train_seconds"], calibration_seconds=m["calibrate"]["seconds"],
        calibration_reads_training_data=m["calibrate"]["reads_training_data"], eval_seconds=m["eval"]["eval_seconds"],
        train_hardware=audit.hardware(run["gpu"], run["gpu_count"]), eval_hardware=audit.hardware(ev["gpu"], ev["gpu_count"]),
        val_bpb=m["eval"]["val_bpb"], targets=ev["targets"], targets_expected=ev["targets_expected"],
        bytes=ev["bytes"], bytes_expected=ev["bytes_expected"],
        val_tokens_trained_before_scored=ev["val_tokens_trained_before_scored"], ttt=ev["ttt"], eval_inputs=ev["inputs"])
    report = audit.check(evidence, params.audit)
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
            "passed": report["passed"]}


if __name__ == "__main__":
    stage.run(main, "audit")
