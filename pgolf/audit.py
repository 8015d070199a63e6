"""The challenge's rules, checked: artifact size, the time budgets, a complete and finite score, and legality.

"audit passed" certifies the challenge as it is: 16,000,000 bytes, 600 s of training and 600 s of eval, train and
validation disjoint, the whole validation split of the source scored, and the blob scored the blob sized. A run under
other limits, or on a partial or demo split, that meets its own settings reads `audit passed (not the challenge: ...)`
and is exported as a non-record submission.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from .config import AuditConfig

CHALLENGE_HARDWARE = "8x NVIDIA H100"
CHALLENGE_LIMIT_BYTES = 16_000_000
CHALLENGE_BUDGET_S = 600.0  # training, and eval
CHALLENGE_VAL_DOCS = 50_000  # FineWeb's validation split: the first 50,000 documents


@dataclass
class Evidence:
    code_bytes: int  # the exported train_gpt.py
    model_bytes: int
    train_seconds: float
    calibration_seconds: float
    calibration_reads_training_data: bool
    eval_seconds: float
    train_hardware: str
    eval_hardware: str
    val_bpb: float
    targets: int  # validation targets scored ...
    targets_expected: int  # ... and in the split
    bytes: int
    bytes_expected: int
    val_tokens_trained_before_scored: int
    ttt: str
    eval_inputs: list[str]
    blob_sha256: str = ""  # the blob the audit sizes ...
    scored_blob_sha256: str = ""  # ... and the one eval scored
    split_sha256: str = ""  # the validation tokens tokenize wrote ...
    scored_split_sha256: str = ""  # ... and those eval scored
    val_docs_in_train: int | None = None  # validation documents found in the train split (jsonl sources)
    data_source: str = "fineweb"
    val_docs: int | None = None  # the split's documents where the source is cut into splits here


def deviations(ev: Evidence, cfg: AuditConfig) -> list[str]:
    """How the run's rules differ from the challenge's (each still checked as set)."""
    out = []
    if cfg.limit_bytes != CHALLENGE_LIMIT_BYTES:
        out.append(f"limit {cfg.limit_bytes:,} bytes")
    if cfg.train_budget_s != CHALLENGE_BUDGET_S or cfg.eval_budget_s != CHALLENGE_BUDGET_S:
        out.append(f"budgets {cfg.train_budget_s:g} s train / {cfg.eval_budget_s:g} s eval")
    if ev.data_source == "builtin":
        out.append("the built-in demo corpus")
    elif ev.val_docs is not None and ev.val_docs != CHALLENGE_VAL_DOCS:
        out.append(f"a validation split of {ev.val_docs:,} documents, not {CHALLENGE_VAL_DOCS:,}")
    return out


def check(ev: Evidence, cfg: AuditConfig) -> dict:
    failures: list[str] = []
    total = ev.code_bytes + ev.model_bytes
    if total > cfg.limit_bytes:
        failures.append(f"size: code {ev.code_bytes:,} + model {ev.model_bytes:,} = {total:,} bytes exceeds "
                        f"{cfg.limit_bytes:,} by {total - cfg.limit_bytes:,}")
    counted = ev.calibration_seconds if ev.calibration_reads_training_data else 0.0
    train_total = ev.train_seconds + counted
    if train_total > cfg.train_budget_s:
        failures.append(f"train time: {ev.train_seconds:.1f}s training + {counted:.1f}s calibration on training data "
                        f"= {train_total:.1f}s exceeds {cfg.train_budget_s:.0f}s by {train_total - cfg.train_budget_s:.1f}s "
                        f"(lower train.max_seconds or raise train.calibration_reserve_s)")
    if ev.eval_seconds > cfg.eval_budget_s:
        failures.append(f"eval time: {ev.eval_seconds:.1f}s exceeds {cfg.eval_budget_s:.0f}s by "
                        f"{ev.eval_seconds - cfg.eval_budget_s:.1f}s")
    if (ev.targets, ev.bytes) != (ev.targets_expected, ev.bytes_expected):
        failures.append(f"coverage: {ev.targets:,} targets / {ev.bytes:,} bytes scored, the validation split has "
                        f"{ev.targets_expected:,} / {ev.bytes_expected:,}")
    if not math.isfinite(ev.val_bpb):
        failures.append(f"score: val_bpb is {ev.val_bpb}, not a finite number")
    if ev.val_tokens_trained_before_scored:
        failures.append(f"legality: {ev.val_tokens_trained_before_scored:,} validation tokens were trained on "
                        f"before being scored")
    seen_train = [f for f in ev.eval_inputs if not Path(f).name.startswith("val_")]
    if seen_train:
        failures.append(f"legality: eval read non-validation data: {', '.join(seen_train)}")
    if ev.val_docs_in_train:
        failures.append(f"legality: {ev.val_docs_in_train:,} validation documents also appear in the training split")
    if ev.blob_sha256 != ev.scored_blob_sha256:
        failures.append(f"integrity: the blob sized (sha256 {ev.blob_sha256[:12]}) is not the blob eval scored "
                        f"({ev.scored_blob_sha256[:12] or 'none recorded'}); rerun eval")
    if ev.split_sha256 != ev.scored_split_sha256:
        failures.append(f"coverage: eval scored validation tokens (sha256 {ev.scored_split_sha256[:12] or 'none'}) "
                        f"other than the split tokenize wrote ({ev.split_sha256[:12] or 'none'})")
    off = deviations(ev, cfg)
    notes = [f"{what} measured on {hw}, not {CHALLENGE_HARDWARE}: times are not the challenge's"
             for what, hw in (("training", ev.train_hardware), ("eval", ev.eval_hardware)) if hw != CHALLENGE_HARDWARE]
    return {
        "passed": not failures, "failures": failures, "notes": notes,
        "challenge": not failures and not off, "deviations": off,
        "code_bytes": ev.code_bytes, "model_bytes": ev.model_bytes, "total_bytes": total,
        "limit_bytes": cfg.limit_bytes, "headroom_bytes": cfg.limit_bytes - total,
        "train_seconds": round(ev.train_seconds, 3), "calibration_seconds": round(ev.calibration_seconds, 3),
        "train_seconds_counted": round(train_total, 3), "train_budget_s": cfg.train_budget_s,
        "eval_seconds": round(ev.eval_seconds, 3), "eval_budget_s": cfg.eval_budget_s,
        "train_hardware": ev.train_hardware, "eval_hardware": ev.eval_hardware, "val_bpb": ev.val_bpb,
        "blob_sha256": ev.blob_sha256,
        "ttt": ev.ttt, "val_tokens_trained_before_scored": ev.val_tokens_trained_before_scored,
    }


def hardware(gpu: str, count: int) -> str:
    return f"{count}x {gpu}" if count else "cpu"


def verdict(report: dict) -> str:
    """`passed`, `passed (not the challenge: ...)` or `FAILED: ` and what failed."""
    if not report["passed"]:
        return "FAILED: " + "; ".join(f.split(":")[0] for f in report["failures"])
    off = report.get("deviations")
    return f"passed (not the challenge: {'; '.join(off)})" if off else "passed"


def summary(report: dict) -> str:
    """The one line a run ends with."""
    total, limit = report["total_bytes"], report["limit_bytes"]
    room = f"{limit - total:,} under" if total <= limit else f"{total - limit:,} over"
    return f"val_bpb {report['val_bpb']:.6f} | total {total:,} bytes ({room} {limit:,}) | audit {verdict(report)}"
