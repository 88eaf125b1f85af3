"""benchmarks/speed.py runs end to end and reports every figure (a)-(d). A smoke test: it checks
the table and the JSON, never a timing (timings are the benchmark's output, not assertions)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import speed  # noqa: E402


def test_the_speed_benchmark_reports_every_figure(tmp_path, capsys):
    report = speed.main(["--epochs", "4", "--repeats", "1", "--set", "model.options.width=8",
                         "--d-on-cpu", "--gpu-images", "48", "--gpu-batch", "16", "--gpu-epochs", "1",
                         "--gpu-workers", "0", "--json", str(tmp_path / "speed.json")])
    printed = capsys.readouterr().out
    for figure in ("(a) COLAM/hl time, pass, m=4", "(a) COLAM/hl time, online", "(b) estimation pass",
                   "(c) trainer / bare loop", "(d) PreActResNet-18 bf16, resident", "(d) PreActResNet-18 bf16, dataloader"):
        assert figure in printed, figure
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["table"] in printed and saved["machine"] == report["machine"]
    # the pass run estimated once per stage end (4 stages)
    assert len(saved["runs"]["colam_pass"][0]["estimation_s"]) == 4
    assert saved["d"]["resident"]["flops_per_image"] > 1e9  # PreActResNet-18: ~1.7 GFLOP per image, forward+backward
    assert saved["d"]["resident"]["mfu"] is None  # no peak is known for a CPU


def test_without_a_gpu_the_benchmark_says_d_was_not_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed.torch.cuda, "is_available", lambda: False)
    speed.main(["--epochs", "4", "--repeats", "1", "--set", "model.options.width=8",
                "--json", str(tmp_path / "speed.json")])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| (d)"))
    assert "no GPU on this machine" in line and "not measured" in line
