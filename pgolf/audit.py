"""The challenge's rules, checked: artifact size, the time budgets and legality."""

from dataclasses import dataclass
from pathlib import Path

from .config import AuditConfig

CHALLENGE_HARDWARE = "8x NVIDIA H100"


def code_files(root: Path) -> list[Path]:
    """Every source file the evaluation needs: the pgolf package, the eval stage and its launcher."""
    files = sorted((root / "pgolf").glob("*.py"))
    return files + [root / "stages" / "__init__.py", root / "stages" / "launch.py", root / "stages" / "eval.py"]


@dataclass
class Evidence:
    code_bytes: int
    model_bytes: int
    train_seconds: float
    calibration_seconds: float
    calibration_source: str
    eval_seconds: float
    train_hardware: str
    eval_hardware: str
    val_tokens_trained_before_scored: int
    ttt_enabled: bool
    eval_inputs: list[str]


def check(ev: Evidence, cfg: AuditConfig) -> dict:
    failures: list[str] = []
    total = ev.code_bytes + ev.model_bytes
    if total > cfg.limit_bytes:
        failures.append(f"size: code {ev.code_bytes:,} + model {ev.model_bytes:,} = {total:,} bytes exceeds "
                        f"{cfg.limit_bytes:,} by {total - cfg.limit_bytes:,}")
    counted_calibration = ev.calibration_seconds if ev.calibration_source == "train" else 0.0
    train_total = ev.train_seconds + counted_calibration
    if train_total > cfg.train_budget_s:
        failures.append(f"train time: {ev.train_seconds:.1f}s training + {counted_calibration:.1f}s calibration on "
                        f"training data = {train_total:.1f}s exceeds {cfg.train_budget_s:.0f}s by "
                        f"{train_total - cfg.train_budget_s:.1f}s")
    if ev.eval_seconds > cfg.eval_budget_s:
        failures.append(f"eval time: {ev.eval_seconds:.1f}s exceeds {cfg.eval_budget_s:.0f}s by "
                        f"{ev.eval_seconds - cfg.eval_budget_s:.1f}s")
    if ev.calibration_source not in ("train", "self"):
        failures.append(f"calibration source {ev.calibration_source!r}: only training data or self-generated "
                        f"sequences are allowed")
    if ev.val_tokens_trained_before_scored:
        failures.append(f"legality: {ev.val_tokens_trained_before_scored} validation tokens were trained on "
                        f"before being scored")
    seen_train = [f for f in ev.eval_inputs if not Path(f).name.startswith("val_")]
    if seen_train:
        failures.append(f"legality: eval read non-validation data: {', '.join(seen_train)}")
    notes = [f"{what} measured on {hw}, not {CHALLENGE_HARDWARE}: times are not the challenge's"
             for what, hw in (("training", ev.train_hardware), ("eval", ev.eval_hardware)) if hw != CHALLENGE_HARDWARE]
    return {
        "passed": not failures,
        "failures": failures,
        "notes": notes,
        "code_bytes": ev.code_bytes,
        "model_bytes": ev.model_bytes,
        "total_bytes": total,
        "limit_bytes": cfg.limit_bytes,
        "train_seconds": round(ev.train_seconds, 3),
        "calibration_seconds": round(ev.calibration_seconds, 3),
        "calibration_source": ev.calibration_source,
        "train_seconds_counted": round(train_total, 3),
        "train_budget_s": cfg.train_budget_s,
        "eval_seconds": round(ev.eval_seconds, 3),
        "eval_budget_s": cfg.eval_budget_s,
        "train_hardware": ev.train_hardware,
        "eval_hardware": ev.eval_hardware,
        "ttt": "score_first" if ev.ttt_enabled else "off",
        "val_tokens_trained_before_scored": ev.val_tokens_trained_before_scored,
    }


def hardware(gpu: str, count: int) -> str:
    return f"{count}x {gpu}" if count else "cpu"
