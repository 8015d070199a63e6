"""audit: artifacts/audit/audit.json: size, time and legality of the run; fails the pipeline if strict."""

import sys
from pathlib import Path

from pgolf import audit, stage
from pgolf.config import load_params
from pgolf.io import read_json, write_json

OUT = stage.ARTIFACTS / "audit" / "audit.json"


def main() -> dict:
    params = load_params()
    m = {s: read_json(stage.ARTIFACTS / s / "metrics.json") for s in ("train", "calibrate", "compress", "eval")}
    files = audit.code_files(Path("."))
    evidence = audit.Evidence(
        code_bytes=sum(f.stat().st_size for f in files),
        model_bytes=(stage.ARTIFACTS / "compress" / "model.blob").stat().st_size,
        train_seconds=m["train"]["train_seconds"],
        calibration_seconds=m["calibrate"]["seconds"],
        calibration_source=m["calibrate"]["source"],
        eval_seconds=m["eval"]["eval_seconds"],
        train_hardware=audit.hardware(m["train"]["gpu"], m["train"]["gpu_count"]),
        eval_hardware=audit.hardware(m["eval"]["gpu"], m["eval"]["gpu_count"]),
        val_tokens_trained_before_scored=m["eval"]["val_tokens_trained_before_scored"],
        ttt_enabled=m["eval"]["ttt"] != "off",
        eval_inputs=m["eval"]["inputs"],
    )
    report = audit.check(evidence, params.audit) | {"code_files": [str(f) for f in files]}
    write_json(OUT, report)
    for line in report["failures"]:
        print(f"audit: FAIL {line}", file=sys.stderr)
    for line in report["notes"]:
        print(f"audit: note {line}")
    print(f"audit: {'passed' if report['passed'] else 'FAILED'}: {report['total_bytes']:,} of {report['limit_bytes']:,} bytes")
    if params.audit.strict and not report["passed"]:
        sys.exit(1)
    return {"passed": report["passed"], "total_bytes": report["total_bytes"]}


if __name__ == "__main__":
    stage.run(main, "audit")
