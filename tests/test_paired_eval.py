"""bench/paired_eval.py compares two evaluations of the same images, image by image."""

import json
from pathlib import Path

import numpy as np
import pytest
from benches import load_bench


@pytest.fixture(scope="module")
def paired_eval():
    return load_bench("paired_eval")


def write_evaluation(folder: Path, nll, elbo, khat, index=None, threshold=0.7) -> Path:
    folder.mkdir(parents=True)
    index = np.arange(len(nll)) if index is None else np.asarray(index)
    np.savez(folder / "per_example.npz", log_likelihood=-np.asarray(nll, float), elbo=np.asarray(elbo, float),
             khat=np.asarray(khat, float), index=index)
    (folder / "results.json").write_text(json.dumps({"khat": {"threshold": threshold}}))
    return folder


def test_row_gives_the_paired_differences_and_shares(tmp_path, paired_eval, capsys):
    a = write_evaluation(tmp_path / "a", nll=[100, 90, 80, 70], elbo=[-105, -95, -85, -75], khat=[0.5, 0.9, 0.6, 0.8])
    b = write_evaluation(tmp_path / "b", nll=[98, 91, 77, 70], elbo=[-101, -95, -84, -76], khat=[1.0, 1.0, 0.2, 0.75])
    paired_eval.main([str(a), str(b)])
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[2].strip("|").split("|")]
    # NLL differences -2, +1, -3, 0: mean -1, sd sqrt(10/3), s.e. sd / 2
    # -ELBO differences -4, 0, -1, +1: mean -1, sd sqrt(14/3)
    assert cells == [
        "4", "85.00", "84.00", f"-1.00 ± {np.sqrt(10 / 3) / 2:.2f}", f"-1.00 ± {np.sqrt(14 / 3) / 2:.2f}", "50 %", "0.70 (50.0 %)", "0.74 (75.0 %)",
    ]


def test_several_pairs_add_the_spread_over_pairs(tmp_path, paired_eval, capsys):
    folders = []
    for seed, shift in enumerate((-1.0, -3.0)):
        folders += [
            write_evaluation(tmp_path / f"a{seed}", nll=[10, 20], elbo=[-11, -21], khat=[0.1, 0.2]),
            write_evaluation(tmp_path / f"b{seed}", nll=[10 + shift, 20 + shift], elbo=[-11, -21], khat=[0.1, 0.2]),
        ]
    paired_eval.main([str(f) for f in folders])
    assert capsys.readouterr().out.splitlines()[-1] == f"NLL B − A over 2 pairs: -2.00 ± {np.sqrt(2):.2f} (mean ± sd)"


def test_different_images_are_refused(tmp_path, paired_eval):
    a = write_evaluation(tmp_path / "a", nll=[1, 2], elbo=[-1, -2], khat=[0, 0], index=[0, 1])
    b = write_evaluation(tmp_path / "b", nll=[1, 2], elbo=[-1, -2], khat=[0, 0], index=[0, 2])
    with pytest.raises(SystemExit, match=r"^error: .*evaluated different images; evaluate both with the same split"):
        paired_eval.main([str(a), str(b)])


def test_an_odd_number_of_folders_is_refused(tmp_path, paired_eval, capsys):
    a = write_evaluation(tmp_path / "a", nll=[1], elbo=[-1], khat=[0])
    with pytest.raises(SystemExit) as exit_info:
        paired_eval.main([str(a)])
    assert exit_info.value.code == 2
    assert "give the evaluation folders in pairs" in capsys.readouterr().err
