"""The submission: one self-contained train_gpt.py and the records' folder around it.

train_gpt.py holds, lzma-compressed and base85-encoded like the records' scripts, the source of every module
`pgolf.submission` needs and the run's params. Each run unpacks the modules into a fresh private folder of the
temp dir (mkdtemp: mode 700, a new name; Triton compiles kernels from source files), imports them from there and
removes it at exit, so it runs where pgolf is not installed and never imports a folder someone else prepared.
Its size is the run's code bytes: the audit counts it, and quantize fits the model to what the limit leaves
(`model_budget`).
"""

import base64
import dataclasses
import datetime
import hashlib
import json
import lzma
import random
import re
import shutil
import sys
from pathlib import Path

from . import config, deps, paths
from .audit import verdict
from .config import ExportConfig, Params
from .errors import PgolfError
from .io import atomic_dir, read_json, sha256_file

ENTRY = "pgolf.submission"
LAUNCHER = '''\
# pgolf submission: the training, quantization and evaluation code and this run's params (lzma + base85).
# torchrun --standalone --nproc_per_node=8 train_gpt.py    |    python train_gpt.py eval final_model.blob
import atexit,base64,json,lzma,os,shutil,sys,tempfile
S=json.loads(lzma.decompress(base64.b85decode("%s")))
D=tempfile.mkdtemp(prefix="pgolf-")
atexit.register(shutil.rmtree,D,True)
for n,src in S["modules"].items():
 f=os.path.join(D,*n.split("/"))
 os.makedirs(os.path.dirname(f),exist_ok=True)
 with open(f,"w") as o:o.write(src)
sys.path.insert(0,D)
from pgolf.errors import PgolfError
from pgolf.submission import main
try:main(S["params"],os.path.getsize(__file__))
except PgolfError as e:sys.exit("error: %%s"%%e)
'''


def embedded_modules(root: Path = deps.ROOT) -> dict[str, str]:
    """Source file (its path in the repository, as the script writes it back) -> source, for everything the
    submission imports."""
    return {path.as_posix(): (root / path).read_text() for path in deps.closure(ENTRY, root)}


def script(params: Params, root: Path = deps.ROOT) -> bytes:
    """train_gpt.py for a run with these params; the same inputs give the same bytes."""
    payload = json.dumps({"modules": embedded_modules(root), "params": dataclasses.asdict(params)},
                         sort_keys=True, separators=(",", ":")).encode()
    packed = base64.b85encode(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)).decode()
    return (LAUNCHER % packed).encode()


def script_bytes(params: Params) -> int:
    """The run's code bytes: the size of its train_gpt.py."""
    return len(script(params))


def widest(params: Params) -> Params:
    """The params with each export text at its longest and least compressible: random characters beyond the Basic
    Multilingual Plane (JSON writes each as a surrogate pair of escapes, ~20 bits of entropy a character, more than
    any other character carries), as many as the pattern allows. A train_gpt.py no smaller than any texts give."""
    rng = random.Random(0)

    def longest(f: dataclasses.Field) -> str:
        n = int(re.search(r"\{1,(\d+)\}", f.metadata["pattern"])[1])
        return "".join(chr(rng.randrange(0x10000, 0x110000)) for _ in range(n))

    return dataclasses.replace(params, export=ExportConfig(**{f.name: longest(f)
                                                               for f in dataclasses.fields(ExportConfig)}))


def model_budget(params: Params) -> int | None:
    """quant.target_bytes resolved against this run's train_gpt.py with the longest export texts: a name or author
    changed after the fit (export reruns, quantize does not) cannot push the artifact over the limit. A limit that
    leaves the model no room is one line (the check stage asks before any training)."""
    budget = config.model_budget(params, script_bytes(widest(params)))
    if budget is not None and budget <= 0:
        code = params.audit.limit_bytes - budget - params.quant.target_margin
        raise PgolfError(f"audit.limit_bytes: {params.audit.limit_bytes:,} leaves no room for the model: train_gpt.py "
                         f"takes up to {code:,} bytes, plus quant.target_margin {params.quant.target_margin:,}")
    return budget


TECHNIQUES = [  # (what is on, how to say it)
    (lambda p: p.model.recur_start >= 0, lambda p: f"depth recurrence: layers {p.model.recur_start}-{p.model.recur_end} "
                                                   f"run {1 + p.model.recur_loops}x"),
    (lambda p: p.model.parallel_from >= 0, lambda p: f"parallel residuals from layer {p.model.parallel_from}"
                                                     + (" in two lanes" if p.model.parallel_lanes == 2 else "")),
    (lambda p: p.train.doc_mask or p.eval.doc_mask, lambda p: "attention inside documents ("
     + ", ".join(w for w, on in (("training", p.train.doc_mask), ("eval", p.eval.doc_mask)) if on) + ")"),
    (lambda p: p.model.unet_skips, lambda p: "U-Net skips" + (" with sigmoid gates" if p.model.skip_gates else "")),
    (lambda p: p.model.xsa_last > 0, lambda p: f"XSA on the last {p.model.xsa_last} layers"),
    (lambda p: p.model.sparse_gate, lambda p: f"SparseAttnGate (window {p.model.gate_window})"),
    (lambda p: p.model.head_gate, lambda p: "gated attention"),
    (lambda p: p.model.smear_gate != "off", lambda p: f"SmearGate ({p.model.smear_gate})"),
    (lambda p: p.model.bigram_buckets > 0, lambda p: f"BigramHash({p.model.bigram_buckets})"),
    (lambda p: p.model.ve_last > 0, lambda p: f"value embeddings on the last {p.model.ve_last} layers"),
    (lambda p: p.model.ortho_init, lambda p: "OrthoInit"),
    (lambda p: p.train.muon_row_norm, lambda p: "MuonEq-R"),
    (lambda p: p.train.ns_coeffs != "quintic", lambda p: f"Newton-Schulz coefficients: {p.train.ns_coeffs}"),
    (lambda p: p.train.qat_threshold > 0, lambda p: f"late QAT int{p.train.qat_bits}"),
    (lambda p: p.train.swa, lambda p: "SWA"),
    (lambda p: True, lambda p: f"quantization: {p.quant.method}" + (f" ({p.quant.clip_rule} scales)"
                                                                    if p.quant.method == "gptq" else "")),
    (lambda p: p.quant.lqer_rank > 0, lambda p: f"LQER rank {p.quant.lqer_rank} on {p.quant.lqer_tensors} tensors"),
    (lambda p: p.data.caseops, lambda p: "CaseOps"),
    (lambda p: p.eval.mode != "sliding" or p.eval.stride, lambda p: f"eval: {p.eval.mode}"
                                                                    + (f", stride {p.eval.stride}" if p.eval.stride else "")),
]


def techniques(params: Params) -> list[str]:
    return [say(params) for on, say in TECHNIQUES if on(params)]


def submission_json(params: Params, metrics: dict[str, dict], audit: dict) -> dict:
    ev, train = metrics["eval"], metrics["train"]
    return {
        "author": params.export.author, "github_id": params.export.github_id, "name": params.export.name,
        "blurb": "; ".join(techniques(params)),
        # the record track only for what the audit certified as the challenge; anything else is a non-record
        "date": datetime.date.today().isoformat(), "track": "10min_16mb" if audit.get("challenge") else "non_record_16mb",
        "val_bpb": ev["val_bpb"], "val_loss": ev["val_loss"],
        "bytes_total": audit["total_bytes"], "bytes_code": audit["code_bytes"], "bytes_model": audit["model_bytes"],
        "hardware": audit["train_hardware"],
        "train_seconds": train["train_seconds"], "eval_seconds": ev["eval_seconds"], "steps": train["steps"],
        "ms_per_step": train["ms_per_step"], "audit_passed": audit["passed"],
        "not_the_challenge": audit.get("deviations", []),
    }


def readme(params: Params, sub: dict, metrics: dict[str, dict], audit: dict) -> str:
    ev = metrics["eval"]
    lines = [f"# {sub['name']}", "",
             f"**val_bpb: {ev['val_bpb']:.6f}** | {sub['bytes_total']:,} bytes ({sub['bytes_code']:,} code + "
             f"{sub['bytes_model']:,} model) | {sub['hardware']}", "",
             "## Results", "", "| metric | value |", "|---|---|"]
    for key, value in [("pre-quantization val_bpb", metrics["ema"]["prequant_val_bpb"]), ("val_bpb", ev["val_bpb"]),
                       ("val_loss", ev["val_loss"]), ("quant gap", ev.get("quant_gap")),
                       ("steps", metrics["train"]["steps"]), ("train seconds", metrics["train"]["train_seconds"]),
                       ("calibration seconds", metrics["calibrate"]["seconds"]),
                       ("eval seconds", ev["eval_seconds"]), ("audit", verdict(audit))]:
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Techniques", ""] + [f"- {t}" for t in techniques(params)]
    data = paths.TOKENIZED.resolve()
    lines += ["", "## Run", "", "```bash", "torchrun --standalone --nproc_per_node=8 train_gpt.py", "```", "",
              "Data in the challenge's layout (`data/cached_challenge_fineweb.py`), or `DATA_PATH` / `TOKENIZER_PATH`. "
              "This run's own data, tokenized by its pipeline, scores the included blob:", "",
              "```bash", f"DATA_PATH={data} python train_gpt.py eval final_model.blob", "```", "",
              "## Params", "", "```json", json.dumps(dataclasses.asdict(params), indent=1, sort_keys=True), "```", ""]
    if audit["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in audit["notes"]] + [""]
    return "\n".join(lines)


def write(out: Path, params: Params, metrics: dict[str, dict], audit: dict, blob: Path, logs: list[Path]) -> None:
    """Fill `out` with the submission folder: train_gpt.py, the blob, submission.json, README.md and the logs. Only
    the script and the blob the audit counted are written: otherwise the folder would describe another run."""
    code = script(params)
    if hashlib.sha256(code).hexdigest() != audit.get("code_sha256"):
        raise PgolfError(f"{paths.AUDIT}: counted another train_gpt.py than these params make (params.yaml changed "
                         f"since; `dvc status` shows what): run dvc repro, then export")
    if sha256_file(blob) != audit.get("blob_sha256"):
        raise PgolfError(f"{blob}: not the blob the audit sized and eval scored (run dvc repro, then export)")
    (out / "train_gpt.py").write_bytes(code)
    shutil.copyfile(blob, out / "final_model.blob")
    sub = submission_json(params, metrics, audit)
    (out / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    (out / "README.md").write_text(readme(params, sub, metrics, audit))
    for log in logs:
        if log.is_file():
            shutil.copyfile(log, out / log.name)


def export_run(params: Params, out: Path) -> Path:
    """The submission folder for the run in artifacts/ (after eval and audit)."""
    metrics = {s: read_json(paths.metrics(s)) for s in ("train", "ema", "calibrate", "eval")}
    for source in (paths.BLOB, paths.TRAIN_LOG, paths.EVAL_LOG):
        if source.is_symlink():  # its target, from anywhere, would be shipped in the submission
            raise PgolfError(f"{source}: is a symbolic link; the submission ships only what the run wrote")
    with atomic_dir(out, "export") as tmp:
        write(tmp, params, metrics, read_json(paths.AUDIT), paths.BLOB, [paths.TRAIN_LOG, paths.EVAL_LOG])
    placeholders = [f"export.{f.name}" for f in dataclasses.fields(ExportConfig)
                    if getattr(params.export, f.name) == f.default]
    if placeholders:
        print(f"warning: {', '.join(placeholders)} still the placeholder; set them (dvc exp run -S export.author=...)",
              file=sys.stderr)
    return out / "train_gpt.py"
