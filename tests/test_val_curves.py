"""bench/val_curves.py reads the validation records of a run in step order and draws them."""

import json
import sys
from pathlib import Path

import pytest
from benches import load_bench


@pytest.fixture(scope="module")
def val_curves():
    return load_bench("val_curves")


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_eval_records_keeps_validation_records_in_step_order(tmp_path, val_curves):
    run = write_run(tmp_path / "run", [
        {"kind": "eval", "step": 200, "val_elbo": -90.0},
        {"kind": "train", "step": 150, "elbo": -95.0},
        {"kind": "eval", "step": 100, "val_elbo": -100.0},
    ])
    assert [(r["step"], r["val_elbo"]) for r in val_curves.eval_records(run)] == [(100, -100.0), (200, -90.0)]


def test_labelled_takes_a_label_or_the_folder_name(val_curves):
    assert val_curves.labelled("seed 1=/tmp/a=b/run") == ("seed 1", Path("/tmp/a=b/run"))
    assert val_curves.labelled("runs/ladder-0") == ("ladder-0", Path("runs/ladder-0"))


def test_main_writes_the_figure(tmp_path, val_curves, monkeypatch):
    run = write_run(tmp_path / "run", [{"kind": "eval", "step": s, "val_elbo": -100.0 + s / 100} for s in (100, 200)])
    out = tmp_path / "figs" / "curve.png"
    monkeypatch.setattr(sys, "argv", ["val_curves.py", f"seed0={run}", "--target", "95", "--out", str(out)])
    val_curves.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
