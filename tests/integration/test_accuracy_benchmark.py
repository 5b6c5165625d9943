"""benchmarks/accuracy.py: its run grouping and tables, and one end-to-end run on the demo data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tsdn.config import ABLATIONS

ROOT = Path(__file__).resolve().parents[2]


def _load_accuracy():
    """benchmarks/ is a folder of scripts: load accuracy.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


acc = _load_accuracy()


def test_ablations_with_the_same_switches_share_one_run():
    runs = acc.ablation_runs("all")
    members = sorted(name for _, names in runs for name in names)
    assert members == sorted(ABLATIONS)
    by_run = {run: set(names) for run, names in runs}
    # Table 3 A = Table 4 A (one-stream AE), 3B = 4C (AE + skips), 3D = 4F (TSDN): 10 names, 7 trainings.
    assert {"t3a", "t4a"} in by_run.values() and {"t3b", "t4c"} in by_run.values()
    assert {"t3d", "t4f"} in by_run.values() and len(runs) == 7
    assert acc.ablation_runs(None) == [("config", ["config"])]
    with pytest.raises(ValueError, match="unknown t9z"):
        acc.ablation_runs("t3a,t9z")


def test_markdown_table_means_products_and_puts_the_paper_beside():
    rows = [
        {"product": "brick", "ablation": "t3d", "pixel_auroc": 0.90},
        {"product": "grass", "ablation": "t3d", "pixel_auroc": 0.70},
        {"product": "brick", "ablation": "patchcore", "pixel_auroc": 0.60},
        {"product": "grass", "ablation": "t3a", "ok": False, "error": "boom"},
    ]
    lines = acc.markdown_table(rows).splitlines()
    assert lines[0] == "| run | brick | grass | mean | paper (mean) |"
    assert lines[2] == "| t3d | 90.0 | 70.0 | 80.0 | 95.6 |"
    assert lines[3] == "| patchcore | 60.0 | - | 60.0 | - |"  # the baseline last; failed runs left out
    assert len(lines) == 4
    assert "FAILED: boom" in acc.format_table(rows)


@pytest.mark.integration
@pytest.mark.slow
def test_one_command_trains_scores_and_compares_on_the_demo_data(ray_local, tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    argv = ["--config", "tiny", "--products", "brick", "--ablations", "t3d,t4f", "--set", "epochs=1"]
    argv += ["--set", "num_workers=1", "--baseline", "patchcore", "--workdir", str(tmp_path), "--out", str(out)]
    assert acc.main(argv) == 0

    report = json.loads(out.read_text())
    assert report["products"] == ["brick"]
    rows = {row["ablation"]: row for row in report["rows"]}
    assert set(rows) == {"t3d", "t4f", "patchcore"}
    assert rows["t3d"]["version"] == rows["t4f"]["version"]  # one training for both names
    for name in ("t3d", "patchcore"):
        for metric in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= rows[name][metric] <= 1.0, (name, metric)
    # The Ray Data score job's own metrics (float16 maps) agree with the registry's test metrics.
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert rows["t3d"]["score_job"][metric] == pytest.approx(rows["t3d"][metric], abs=2e-3)
    assert rows["t3d"]["train_wall_s"] > 0 and rows["t3d"]["predict_images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| t3d | " in printed and "| patchcore | " in printed
    import ray

    assert ray.is_initialized()  # the test session's Ray is left running
