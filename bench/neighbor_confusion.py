"""What neighbor silencing changes in a trained model: how much of each target test image's prediction goes to the
auxiliary classes paired with its true class, for the runs of a ``neighborlt ablate`` Table 6 folder.

For every run and seed (joint models with L + K outputs, ``OUT/runs/<run>/seed<S>/train``), on the target test
images:

* ``direct``: top-1 % with the auxiliary rows masked (the direct classifier; equals the table's row);
* ``to aux``: % of images whose argmax over all L + K outputs is an auxiliary class;
* ``to paired aux``: % whose argmax is an auxiliary class paired with the image's true class;
* ``paired mass``: mean softmax probability (over all L + K outputs) on the true class's paired auxiliary classes;
* ``margin``: mean logit margin z_y − max_{k paired with y} z_k over images whose class has a pair.

The neighbour pairs are rebuilt from the folder's recorded ablation config (the Table 6 setting: its K and split
ratio), and checked against the class ids each model was trained with. ``--pairing visual`` (or ``random``) scores
the same models against the pairs of the ``pairs`` grid instead (``neighborlt.data.auxiliary.repair``): how many of
a model's confusions another pair set would have covered.

Usage::

    .venv/bin/python bench/neighbor_confusion.py runs/ablate_tin30 [--runs balce_aux_crt ns0.1_aux_crt] [--seeds 0]
        [--pairing relation|visual|random]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from neighborlt.ablate import AblationConfig, GridData, run_spec
from neighborlt.rundir import read_json
from neighborlt.train.engine import predict_logits

COLUMNS = ("direct", "to aux", "to paired aux", "paired mass", "margin")


def confusion(logits: np.ndarray, labels: np.ndarray, num_target: int, pairs: np.ndarray) -> dict[str, float]:
    """The figures above for logits [N, L + K] of target test images with labels in 0..L-1."""
    n, c = logits.shape
    paired = np.zeros((num_target, c), dtype=bool)
    for t, a in pairs:
        if t < num_target <= a:
            paired[t, a] = True
        elif a < num_target <= t:
            paired[a, t] = True
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    full = logits.argmax(1)
    mask_y = paired[labels]  # [N, C]: the paired auxiliary classes of each image's class
    has = mask_y.any(1)
    nb_max = np.where(mask_y, logits, -np.inf).max(1)
    return {
        "direct": 100.0 * float((logits[:, :num_target].argmax(1) == labels).mean()),
        "to aux": 100.0 * float((full >= num_target).mean()),
        "to paired aux": 100.0 * float(mask_y[np.arange(n), full].mean()),
        "paired mass": float((p * mask_y).sum(1).mean()),
        "margin": float((logits[np.arange(n), labels] - nb_max)[has].mean()) if has.any() else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a `neighborlt ablate` folder with a finished table6 grid")
    ap.add_argument("--runs", nargs="+", default=None, help="run names under OUT/runs (default: every joint "
                                                             "model with auxiliary outputs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the folder's seeds")
    ap.add_argument("--pairing", choices=["relation", "visual", "random"], default="relation",
                    help="which pairs 'paired' means (default: the folder's relation)")
    args = ap.parse_args(argv)
    cfg = AblationConfig(**read_json(args.out / "records" / "ablate.config.json"))
    data = GridData(cfg, args.out)
    aux = data.training_set(run_spec(cfg, "table6", aux=True, pairing=args.pairing))
    L = int(aux.num_target)
    runs = args.runs or sorted(p.name for p in (args.out / "runs").iterdir()
                               if (p / "seed0" / "train" / "model.json").is_file()
                               and read_json(p / "seed0" / "train" / "model.json")["num_classes"] > L)
    seeds = args.seeds if args.seeds is not None else cfg.seeds
    labels = np.asarray(aux.test.labels)
    rows: dict[str, dict[str, Any]] = {}
    print(f"{args.out}: {L} targets, {aux.num_auxiliary} auxiliary classes, {len(aux.pairs)} {args.pairing} pairs, "
          f"{len(labels)} test images")
    print("| run | seeds | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for run in runs:
        per_seed = []
        for seed in seeds:
            model_dir = args.out / "runs" / run / f"seed{seed}" / "train"
            meta = read_json(model_dir / "model.json")
            if meta["class_ids"] != list(aux.train.class_ids[: meta["num_classes"]]):
                sys.exit(f"{model_dir}: trained on other classes than the Table 6 auxiliary set; pass --runs")
            per_seed.append(confusion(predict_logits(model_dir, aux.test), labels, L, aux.pairs))
        mean = {k: float(np.mean([r[k] for r in per_seed])) for k in COLUMNS}
        rows[run] = {"seeds": per_seed, "mean": mean}
        print(f"| {run} | {','.join(map(str, seeds))} | " + " | ".join(
            f"{mean[k]:.3f}" if k == "paired mass" else f"{mean[k]:.1f}" for k in COLUMNS) + " |", flush=True)
    suffix = "" if args.pairing == "relation" else f"_{args.pairing}"
    (args.out / f"neighbor_confusion{suffix}.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
