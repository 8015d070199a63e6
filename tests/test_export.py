"""The exported submission: one self-contained train_gpt.py that scores the blob like the eval stage, and trains."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT, run
from test_reliability import stage_dir

from pgolf import export
from pgolf.config import check_fields, load_params
from pgolf.errors import PgolfError
from pgolf.io import MARKER

# Runs train_gpt.py under `python -S` with only the installed packages on the path: none of the .pth files that make
# this repository's pgolf importable, so the script has nothing but what it carries.
ISOLATED = """
import sys
sys.path.append(%r)
try:
    import pgolf
    raise SystemExit("pgolf is importable before the script runs")
except ImportError:
    pass
sys.argv = ["train_gpt.py", *sys.argv[1:]]
exec(compile(open("train_gpt.py").read(), "train_gpt.py", "exec"), {"__name__": "__main__", "__file__": "train_gpt.py"})
""" % sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = stage_dir(tmp_path_factory.mktemp("export"), "run", {"iterations": 6})
    for stage in ("train", "ema", "calibrate", "quantize", "compress", "eval", "audit", "export"):
        run([sys.executable, "-m", f"stages.{stage}"], d)
    return d


def isolated(args: list[str], cwd, data, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DATA_PATH": str(data), "PYTHONUNBUFFERED": "1"}
    env |= env_extra
    return subprocess.run([sys.executable, "-S", "-c", ISOLATED, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_exported_script_scores_the_blob_like_the_eval_stage_where_pgolf_is_not_installed(exported, tmp_path):
    folder = tmp_path / "submission"
    shutil.copytree(exported / "artifacts" / "export", folder)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "README.md", "eval.log", "final_model.blob",
                                                        "submission.json", "train.log", "train_gpt.py"]
    p = isolated(["eval", "final_model.blob"], folder, exported / "artifacts/tokenize/data")
    assert p.returncode == 0, p.stderr[-3000:]
    got = float(re.search(r"final val_bpb (\S+)", p.stdout).group(1))
    want = json.loads((exported / "artifacts/eval/metrics.json").read_text())["val_bpb"]
    assert abs(got - want) <= 1e-6
    sub = json.loads((folder / "submission.json").read_text())
    audit = json.loads((exported / "artifacts/audit/audit.json").read_text())
    assert sub["val_bpb"] == want and sub["bytes_code"] == (folder / "train_gpt.py").stat().st_size == audit["code_bytes"]
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"] == audit["total_bytes"]
    assert {"name", "author", "github_id", "date", "hardware", "val_loss", "blurb"} <= set(sub)
    assert f"{want:.6f}" in (folder / "README.md").read_text()


def test_the_exported_script_is_deterministic_and_smaller_than_its_sources(exported):
    params = load_params(exported / "params.yaml")
    a, b = export.script(params), export.script(params)
    assert a == b == (exported / "artifacts/export/train_gpt.py").read_bytes()
    sources = sum(len(text.encode()) for text in export.embedded_modules().values())
    assert len(a) < 0.45 * sources
    assert set(export.embedded_modules()) >= {"pgolf/__init__.py", "pgolf/submission.py", "pgolf/train.py",
                                              "pgolf/quant/__init__.py", "pgolf/quant/gptq.py", "pgolf/pack.py"}
    assert not {"pgolf/export.py", "pgolf/deps.py", "pgolf/cli.py", "pgolf/corpus.py",
                "pgolf/fineweb.py"} & set(export.embedded_modules())


def test_the_exported_script_trains_quantizes_and_scores_on_its_own(exported, tmp_path):
    shutil.copy(exported / "artifacts/export/train_gpt.py", tmp_path / "train_gpt.py")
    p = isolated([], tmp_path, exported / "artifacts/tokenize/data")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train: 6 steps" in p.stdout and re.search(r"quantize: gptq, [\d,]+ model bytes", p.stdout)
    assert re.search(r"final val_bpb \d\.\d{8}", p.stdout) and (tmp_path / "final_model.blob").stat().st_size > 1000
    bad = isolated(["evaluate"], tmp_path, exported / "artifacts/tokenize/data")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: usage: train_gpt.py [eval BLOB]; got evaluate"


def test_the_exported_script_imports_only_what_it_unpacked_itself(exported, tmp_path):
    """An earlier version unpacked into $TMP/pgolf-<sha16 of the payload> and used that folder if it existed: anyone
    could plant code there first. Each run now unpacks into a fresh private folder and removes it at exit."""
    shutil.copytree(exported / "artifacts" / "export", tmp_path / "sub")
    script = (tmp_path / "sub" / "train_gpt.py").read_text()
    payload = re.search(r'b85decode\("([^"]+)"\)', script).group(1).encode()
    temp = tmp_path / "temp"
    planted = temp / ("pgolf-" + hashlib.sha256(base64.b85decode(payload)).hexdigest()[:16]) / "pgolf"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "submission.py").write_text("print('PWNED')\n")
    p = isolated(["eval", "final_model.blob"], tmp_path / "sub", exported / "artifacts/tokenize/data", TMPDIR=str(temp))
    assert p.returncode == 0 and "PWNED" not in p.stdout + p.stderr and "final val_bpb" in p.stdout, p.stderr[-2000:]
    assert [d.name for d in temp.iterdir()] == [planted.parent.name]  # its own folder is gone


@pytest.mark.parametrize("target", [".", "artifacts", "artifacts/train/model", "notes", "mine"])
def test_pgolf_export_refuses_every_target_it_did_not_write(exported, target):
    (exported / "mine").mkdir(exist_ok=True)
    (exported / "mine" / "keep.txt").write_text("keep")
    (exported / "notes").write_text("notes")
    before = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if ".pytest_cache" not in p.parts)
    p = run(["pgolf", "export", "--out", target], exported, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"error: pgolf export: {target}: ")
    assert sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if ".pytest_cache" not in p.parts) == before


def test_pgolf_export_replaces_its_own_earlier_export(exported, tmp_path):
    out = tmp_path / "sub"
    for _ in range(2):
        p = run(["pgolf", "export", "--out", str(out)], exported)
        assert "train_gpt.py" in p.stdout
    assert (out / MARKER).read_text() == "export\n" and (out / "final_model.blob").is_file()


def test_no_export_text_can_push_a_tight_fit_over_the_limit():
    """The attack: a longer export.name after a tight fit failed the audit by 1,974 bytes. The fit's target now
    reserves the longest, least compressible texts the params allow, so it does not move with them, and no allowed
    text makes a train_gpt.py larger than the reserve by more than compression noise (target_margin: 2,000)."""
    import dataclasses
    import random

    from pgolf.config import ExportConfig

    params = load_params(ROOT / "params.yaml")
    reserved = export.script_bytes(export.widest(params))
    rng = random.Random(1)
    alphabets = {"ascii": (33, 127), "cjk": (0x4E00, 0xA000), "astral": (0x10000, 0x110000)}
    for name, (lo, hi) in alphabets.items():
        text = lambda n: "".join(chr(rng.randrange(lo, hi)) for _ in range(n))  # noqa: E731
        texts = dataclasses.replace(params, export=ExportConfig(name=text(200), author=text(100), github_id=text(39)))
        assert export.model_budget(texts) == export.model_budget(params)
        assert export.script_bytes(texts) <= reserved + 100 < reserved + params.quant.target_margin, name
    assert export.script_bytes(params) < reserved
    with pytest.raises(PgolfError, match=r"export.name: 'x{201}'; expected a value matching"):
        check_fields(dataclasses.replace(params, export=ExportConfig(name="x" * 201)))


def test_an_export_of_artifacts_older_than_the_params_is_refused(exported, tmp_path):
    """The new user's stale export: after params changed, export wrote a submission.json and README describing a run
    other than the blob's. It now writes only the script and blob the audit counted."""
    import yaml

    stale = tmp_path / "stale"
    shutil.copytree(exported, stale, ignore=shutil.ignore_patterns("export"))
    params = yaml.safe_load((stale / "params.yaml").read_text())
    params["quant"]["target_bytes"] = 1000
    (stale / "params.yaml").write_text(yaml.safe_dump(params))
    p = run(["pgolf", "export", "--out", "sub"], stale, check=False)
    assert p.returncode == 1 and not (stale / "sub").exists()
    assert p.stderr.strip() == ("error: pgolf export: artifacts/audit/audit.json: counted another train_gpt.py than "
                                "these params make (params.yaml changed since; `dvc status` shows what): run dvc repro, "
                                "then export")
    (stale / "params.yaml").write_text((exported / "params.yaml").read_text())
    (stale / "artifacts/compress/model.blob").write_bytes(b"another blob")
    p = run(["pgolf", "export", "--out", "sub"], stale, check=False)
    assert p.returncode == 1 and "model.blob: not the blob the audit sized and eval scored" in p.stderr


def test_the_exported_eval_names_the_data_path_it_looked_at(exported, tmp_path):
    shutil.copytree(exported / "artifacts" / "export", tmp_path / "sub")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATA_PATH")}
    p = subprocess.run([sys.executable, "-S", "-c", ISOLATED, "eval", "final_model.blob"], cwd=tmp_path / "sub",
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: data/datasets/fineweb10B_sp1024: no val_*.bin shards found (the default path; DATA_PATH sets another; "
        "the exported README gives this run's)")
    readme = (tmp_path / "sub" / "README.md").read_text()
    command = re.search(r"^DATA_PATH=(\S+) python train_gpt.py eval final_model.blob$", readme, re.M)
    assert command and command[1] == str((exported / "artifacts/tokenize/data").resolve())
