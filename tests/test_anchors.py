"""The anchor benches' runner and parsers: an anchor's script stopped where asked, with the processes it started, and
upstream's log read into ms/step as its own clock gives them."""

import json
import os
import textwrap
import time

import pytest
from conftest import bench_module


def test_an_anchor_is_stopped_at_the_line_asked_for_with_every_process_it_started(monkeypatch, tmp_path):
    anchor = bench_module(monkeypatch, "anchor")
    script = tmp_path / "train_gpt.py"
    # a child in the script's session (as inductor's compile workers are), then steps, then a long tail never reached
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open("child.pid", "w").write(str(child.pid))
        for step in range(1, 4):
            print(f"step:{step}/3 {os.environ['ANCHOR_TAG']}", flush=True)
        time.sleep(60)
    """))
    t0 = time.perf_counter()
    out, code, seconds = anchor.run_anchor(script, {"ANCHOR_TAG": "tagged"}, tmp_path / "anchor.log", 30,
                                           lambda line: line.startswith("step:3/3"))
    assert time.perf_counter() - t0 < 20 and seconds < 20
    assert code == -9 and out.splitlines() == [f"step:{s}/3 tagged" for s in (1, 2, 3)]
    logged = (tmp_path / "anchor.log").read_text().splitlines()
    assert len(logged) == 3 and all(line.startswith("[") and "s] step:" in line for line in logged)
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # killed with the session; reaped by init shortly after
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the anchor's child process outlived it")


def test_an_anchor_past_its_budget_is_stopped_with_what_it_logged(monkeypatch, tmp_path):
    anchor = bench_module(monkeypatch, "anchor")
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('compiling', flush=True)\ntime.sleep(60)\n")
    out, code, seconds = anchor.run_anchor(script, {}, tmp_path / "slow.log", 1.5, lambda line: False)
    assert out == "compiling\n" and code == -9 and 1.5 <= seconds < 15


def upstream_log(steps: int, ms: list[float], losses: list[float]) -> str:
    """Lines as upstream's train_gpt.py prints them (TRAIN_LOG_EVERY 5: steps 1-10, then every 5th), its cumulative
    train_time included."""
    lines = ["warmup_step:20/20", "step:0/%d val_loss:6.9 val_bpb:4.1 train_time:0ms step_avg:0.00ms" % steps]
    elapsed = 0.0
    for step in range(1, steps + 1):
        elapsed += ms[step - 1]
        if step <= 10 or step % 5 == 0:
            lines.append(f"step:{step}/{steps} train_loss:{losses[step - 1]:.4f} train_time:{elapsed:.0f}ms "
                         f"step_avg:{elapsed / step:.2f}ms")
    return "\n".join(lines) + "\n"


def test_upstreams_ms_per_step_leaves_out_its_first_steps(monkeypatch):
    ratio = bench_module(monkeypatch, "upstream_ratio")
    # slow first steps (a lazy recompile), then 300 ms a step
    ms = [2000.0, 900.0, 500.0] + [300.0] * 37
    r = ratio.parse_upstream(upstream_log(40, ms, [6.0 - 0.1 * s for s in range(40)]), 40)
    assert r["ms_per_step"] == 300.0
    assert r["tokens_per_s"] == round(524_288 / 0.3)
    assert r["final_loss"] == pytest.approx(2.1) and r["micro_batch_tokens"] == 65_536
    with pytest.raises(ValueError, match="no step 10 or 40"):
        ratio.parse_upstream(upstream_log(40, ms, [5.0] * 40).split("step:40/40")[0], 40)


def test_the_ratio_table_is_upstreams_ms_over_pgolfs(monkeypatch):
    ratio = bench_module(monkeypatch, "upstream_ratio")
    up = {"ms_per_step": 310.2, "tokens_per_s": 1_690_161, "final_loss": 4.1, "micro_batch_tokens": 65_536}
    sides = [{"ms_per_step": 207.9, "tokens_per_s": 2_521_828, "final_loss": 4.09, "micro_batch_tokens": 65_536},
             {"ms_per_step": 155.1, "tokens_per_s": 3_380_323, "final_loss": 4.08, "micro_batch_tokens": 131_072}]
    text, ratios = ratio.table(up, sides)
    assert ratios == {65_536: round(310.2 / 207.9, 4), 131_072: round(310.2 / 155.1, 4)}
    assert "| pgolf, baseline config | 131,072 | 155.1 |" in text and "**2.000**" in text


def test_a_run_cut_after_its_first_pgolf_side_keeps_upstream_and_that_side(monkeypatch, tmp_path):
    ratio = bench_module(monkeypatch, "upstream_ratio")
    monkeypatch.setattr(ratio, "dataset", lambda mirror: (tmp_path, tmp_path / "tok.model"))
    monkeypatch.setattr(ratio, "run_anchor",
                        lambda *a: (upstream_log(20, [300.0] * 20, [5.0] * 20), -9, 30.0))
    sides = iter([{"ms_per_step": 200.0, "tokens_per_s": 2_621_440, "final_loss": 4.9, "micro_batch_tokens": 65_536}])

    def run_pgolf(data, steps, micro):
        side = next(sides, None)
        if side is None:  # the second side never ends: the call's limit
            raise KeyboardInterrupt
        return side

    monkeypatch.setattr(ratio, "run_pgolf", run_pgolf)
    out = tmp_path / "upstream_ratio.json"
    monkeypatch.setattr("sys.argv", ["upstream_ratio.py", "--upstream", "train_gpt.py", "--mirror", str(tmp_path),
                                     "--steps", "20", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        ratio.main()
    saved = json.loads(out.read_text())
    assert saved["upstream"]["ms_per_step"] == 300.0 and len(saved["pgolf"]) == 1
    assert saved["ratios_by_micro"] == {"65536": 1.5}


def test_a_mirror_that_is_no_pgolf_mirror_stops_the_anchor_benches_with_one_line(monkeypatch, tmp_path):
    """Both anchor benches read --mirror through record_parity.dataset: a folder without a manifest, or with one that
    names no dataset, is one line naming --mirror, before anything runs."""
    record_parity = bench_module(monkeypatch, "record_parity")
    manifest = tmp_path / "datasets" / "manifest.json"
    for text in (None, "{not json", json.dumps({"datasets": [], "tokenizers": []})):
        if text is not None:
            manifest.parent.mkdir(exist_ok=True)
            manifest.write_text(text)
        with pytest.raises(SystemExit) as e:
            record_parity.dataset(tmp_path)
        assert str(e.value).startswith(f"--mirror {tmp_path}:") and "\n" not in str(e.value)
    manifest.write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}],
                                    "tokenizers": [{"model_path": "tokenizers/sp1024.model"}]}))
    assert record_parity.dataset(tmp_path) == (tmp_path / "datasets" / "datasets" / "fineweb10B_sp1024",
                                               tmp_path / "datasets" / "tokenizers" / "sp1024.model")
