"""dvc.yaml lists, for every stage, exactly the repository source files its command imports."""

from pathlib import Path

import yaml

from pgolf import deps

ROOT = Path(__file__).resolve().parents[1]


def code_deps_drift(dvc_yaml: dict, root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage: (imported but not listed, listed but not imported) source files."""
    drift = {}
    for name, stage in dvc_yaml["stages"].items():
        module = stage["cmd"].split("python -m ", 1)[1].split()[0]
        listed = {d for d in stage.get("deps", []) if d.endswith(".py")}
        needed = {str(p) for p in deps.closure(module, root)}
        if listed != needed:
            drift[name] = (sorted(needed - listed), sorted(listed - needed))
    return drift


def test_every_stage_lists_exactly_the_code_it_imports():
    drift = code_deps_drift(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert not drift, "dvc.yaml code deps drifted (missing, extra): " + repr(drift)


def test_the_check_fails_when_a_dep_is_removed_or_added():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spec["stages"]["eval"]["deps"].remove("pgolf/score.py")
    spec["stages"]["tokenize"]["deps"].append("pgolf/quant/fit.py")
    assert code_deps_drift(spec) == {"eval": (["pgolf/score.py"], []), "tokenize": ([], ["pgolf/quant/fit.py"])}


def test_imports_are_followed_transitively_and_relatively():
    closure = {str(p) for p in deps.closure("stages.eval")}
    assert {"stages/eval.py", "stages/__init__.py", "pgolf/__init__.py", "pgolf/score.py", "pgolf/ttt.py",
            "pgolf/fused_qk.py"} <= closure  # fused_qk: stages.eval -> pgolf.pack -> pgolf.weights -> pgolf.model
    assert "pgolf/train.py" not in closure and "pgolf/corpus.py" not in closure
    exported = {str(p) for p in deps.closure("stages.audit")}
    assert {"pgolf/submission.py", "pgolf/train.py", "pgolf/optim.py"} <= exported  # it counts the submission's code


def test_no_stage_imports_another_stage():
    for path in (ROOT / "stages").glob("*.py"):
        assert not [m for m in deps.imports_of(f"stages.{path.stem}") if m.startswith("stages.")], path.name
