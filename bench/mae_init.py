"""Does MAE pre-training on the long-tailed targets help a small ViT? Random init vs MAE init, each with Balanced-CE
(targets only) and with auxiliary classes + neighbor silencing, over seeds (issue 23, item 3).

One run directory is made up to the filter (CIFAR-10 split-neighbour protocol, WordNet neighbours, the local pool,
feature rules off); per seed a copy gets ``neighborlt pretrain --method mae`` and four fine-tuning runs. Prints a
Markdown table of overall and few-shot test accuracy (mean ± std over seeds) and writes it to ``OUT/mae_init.md``.

    python bench/mae_init.py OUT --model vit_pico_patch4_32 --seeds 0 1 2 --n-max 100 --pretrain-epochs 20 \
        --epochs 15

Timings depend on the machine's load; the script prints its wall seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from neighborlt.pipeline import PipelineConfig, run_pipeline
from neighborlt.pretrain.config import PretrainConfig
from neighborlt.pretrain.stage import run_pretrain
from neighborlt.train.config import TrainConfig
from neighborlt.train.engine import run_train

FILTER = {"caption": False, "band": False, "leak": False, "dedup": False, "sheets": 0}
DATA_STAGES = ("split.json", "classes.json", "targets.parquet", "neighbors.json", "retrieve", "filter", "records")


def _copy_data(base: Path, dst: Path) -> Path:
    if dst.exists():
        return dst
    dst.mkdir(parents=True)
    for name in DATA_STAGES:
        src = base / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    return dst


def _mean_std(ms: list[dict[str, float]], k: str) -> str:
    x = np.array([m[k] for m in ms if m.get(k) is not None], dtype=float)
    return f"{x.mean():.1f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="vit_pico_patch4_32")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-max", type=int, default=100)
    ap.add_argument("--imbalance-ratio", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    t0 = time.time()
    base = a.out / "data"
    run_pipeline(PipelineConfig(data_dir=a.data_dir, protocol_overrides={"n_max": a.n_max,
                                                                         "imbalance_ratio": a.imbalance_ratio},
                                filter=FILTER, report=False), base, progress=False, until_stage="filter")
    common = {"model": a.model, "image_size": 32, "epochs": a.epochs, "warmup_epochs": 1, "batch_size": a.batch_size,
              "optimizer": "adamw", "lr": a.lr, "weight_decay": 0.05, "layer_decay": 0.75, "eval_every": 0,
              "threads": a.threads, "data_dir": a.data_dir}
    variants = {"Bal-CE": {"loss": "balanced_softmax", "aux_manifest": None},
                "aux + neighbor silencing": {"loss": "neighbor_silencing", "aux_cap": 50}}
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in a.seeds:
        sdir = a.out / f"seed{seed}"
        pre = _copy_data(base, sdir / "mae")
        res = run_pretrain(PretrainConfig(model=a.model, image_size=32, epochs=a.pretrain_epochs,
                                          warmup_epochs=max(1, a.pretrain_epochs // 10), batch_size=64,
                                          decoder_dim=128, decoder_depth=2, decoder_heads=4, seed=seed,
                                          data_dir=a.data_dir, threads=a.threads), pre)
        print(f"seed {seed}: MAE loss {res.loss:.4f} after {a.pretrain_epochs} epochs", flush=True)
        for init_name, init in (("random init", "random"), ("MAE init", str(pre / "pretrain" / "encoder.safetensors"))):
            for vname, v in variants.items():
                rdir = _copy_data(base, sdir / f"{init_name.split()[0].lower()}_{vname.split()[0].lower()}")
                r = run_train(TrainConfig(**common, **v, init=init, seed=seed), rdir, progress=False)
                rows.setdefault((init_name, vname), []).append(r.metrics)
                print(f"seed {seed} {init_name} {vname}: {r.metrics}", flush=True)
    lines = ["| init | training | overall | few-shot | seeds |", "|---|---|---|---|---|"]
    for (init_name, vname), ms in rows.items():
        lines.append(f"| {init_name} | {vname} | {_mean_std(ms, 'overall')} | {_mean_std(ms, 'few')} | {len(ms)} |")
    table = "\n".join(lines)
    (a.out / "mae_init.md").write_text(table + "\n")
    (a.out / "mae_init.json").write_text(json.dumps({f"{k[0]} / {k[1]}": v for k, v in rows.items()}, indent=1))
    print(table)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
