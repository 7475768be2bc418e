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


def test_first_crossing_interpolates_where_the_lower_curve_overtakes(val_curves):
    # b: -110 at 0, -90 at 10; a flat at -100: b crosses at 5 minutes
    assert val_curves.first_crossing([0, 10], [-100, -100], [0, 10], [-110, -90]) == pytest.approx(5.0)
    # a rises from -100 to -96 over [0, 4]; b, flat at -98 from 2 on, starts level with a: nothing to cross
    assert val_curves.first_crossing([0, 4], [-100, -96], [2, 4], [-98, -98]) is None
    # b meets a at 4 minutes (both -100) and is above it after: the crossing is at 4
    assert val_curves.first_crossing([0, 4, 8], [-100, -100, -95], [0, 8], [-108, -92]) == pytest.approx(4.0)


def test_first_crossing_none_when_never_above_or_no_overlap(val_curves):
    assert val_curves.first_crossing([0, 10], [-100, -90], [0, 10], [-120, -91]) is None
    assert val_curves.first_crossing([0, 1], [-100, -90], [2, 3], [-80, -70]) is None  # no common minutes


def test_main_against_minutes_prints_the_crossing(tmp_path, val_curves, monkeypatch, capsys):
    mlp = write_run(tmp_path / "mlp", [{"kind": "eval", "step": s, "elapsed_s": 60 * m, "val_elbo": v}
                                       for s, m, v in ((1000, 1, -100.0), (2000, 2, -99.0), (3000, 3, -98.0))])
    conv = write_run(tmp_path / "conv", [{"kind": "eval", "step": s, "elapsed_s": 60 * m, "val_elbo": v}
                                         for s, m, v in ((100, 1, -110.0), (200, 3, -90.0))])
    out = tmp_path / "curve.png"
    monkeypatch.setattr(sys, "argv", ["val_curves.py", f"MLP={mlp}", f"conv={conv}", "--against", "minutes", "--out", str(out)])
    val_curves.main()
    # conv - MLP: -10 at 1 minute, -1 at 2 (conv -100, MLP -99), +8 at 3: the crossing is at 2 + 1/9
    assert capsys.readouterr().out.splitlines()[-1] == f"conv rises above MLP after {2 + 1 / 9:.1f} minutes"
