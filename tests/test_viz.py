"""``neighborlt viz`` on a tiny finished pipeline run (conftest ``tiny_run``: CIFAR-10 protocol, a 2-block ViT with
4-px patches, method + Balanced-CE baseline): the three figures, byte-identical when drawn again, and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import run_cli

from neighborlt.viz import CAPTIONS, FIGURES, VizConfig, run_viz, viz_figures


@pytest.fixture(scope="module")
def vit_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny ViT pipeline run (conftest ``tiny_run``), which viz writes into."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("viz") / "run"))


@pytest.mark.slow  # the tiny pipeline (shared with test_report) and UMAP's first numba compilation
def test_viz_draws_the_three_figures_deterministically(vit_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["viz", str(vit_run), "--per-class", "12"]) == 0
    out = capsys.readouterr().out
    paths = [vit_run / "viz" / f"{name}.png" for name in FIGURES]
    for p in paths:
        assert str(p) in out
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # something is drawn
    first = [p.read_bytes() for p in paths]
    res = run_viz(VizConfig(per_class=12), vit_run)  # drawn again: the same bytes
    assert set(res.figures) == set(FIGURES) and not res.skipped
    assert [p.read_bytes() for p in paths] == first
    assert not list((vit_run / "viz").glob(".*.tmp"))  # atomic writes leave no temp files
    figs = viz_figures(vit_run)
    assert [p.name for p, _ in figs] == [f"{n}.png" for n in FIGURES]
    assert [c for _, c in figs] == [CAPTIONS[n] for n in FIGURES] and all("look for" in c for _, c in figs)
    # another seed moves the UMAP points (so the comparison above can fail)
    run_viz(VizConfig(per_class=12, seed=1, figures=["umap"]), vit_run)
    assert (vit_run / "viz" / "umap.png").read_bytes() != first[0]


def test_pca_rgb_needs_patch_tokens() -> None:
    import torch

    from neighborlt.train.models import create_model
    from neighborlt.viz import _patch_tokens, _Skip

    vit = create_model("vit_pico_patch4_32", 3)
    tokens, grid = _patch_tokens(vit, torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 64, 64) and grid == 8
    with pytest.raises(_Skip, match=r"PCA-RGB needs patch tokens \(a ViT\); model CifarResNet has none"):
        _patch_tokens(create_model("resnet8_cifar", 3), torch.zeros(2, 3, 32, 32))


def test_bad_runs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["viz", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such run directory" in err and "\n" not in err
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "model.json").write_text("{}")
    assert run_cli(["viz", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval/metrics.json: not found" in err and f"neighborlt eval {run}" in err and "\n" not in err
    assert run_cli(["viz", str(run), "--figure", "tsne"]) == 2
    assert "--figure 'tsne'" in capsys.readouterr().err


@pytest.mark.slow
def test_viz_without_eval_of_a_real_run(vit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "copy"
    shutil.copytree(vit_run, run)
    (run / "eval" / "metrics.json").unlink()
    assert run_cli(["viz", str(run)]) == 2
    assert "neighborlt eval" in capsys.readouterr().err
