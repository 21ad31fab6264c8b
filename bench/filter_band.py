"""How the filter's feature band separates a target's true neighbours from unrelated images (picks γ1 / γ2).

On the Tiny-ImageNet-LT-neighbours protocol every target has WordNet siblings in the pool. For each target we take
the cosine between its prototype (mean L2-normalised feature of its long-tailed training images) and (a) every
image of its sibling pool classes, (b) an equal-sized sample of images of unrelated pool classes, and print, over a
grid of γ1 < cos < γ2, the share of sibling and of unrelated images that pass, per shot group. A good band keeps
most sibling images and few unrelated ones; the paper publishes no values.

    .venv/bin/python bench/filter_band.py --out runs/bench_band

Features: the offline EfficientNet-Lite0 ImageNet weights at 64 px (the stand-in for DINOv2; it has seen
Tiny-ImageNet's classes, so the separation is optimistic), cached by content. The last column is γ2's job: the
share of the target's own test images that would pass (an auxiliary image that *is* the target class should not).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="tiny-imagenet-lt-neighbours")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_band")
    ap.add_argument("--low", default="0.2,0.3,0.4,0.45,0.5,0.55,0.6,0.7")
    ap.add_argument("--high", default="0.85,0.9,0.95,1.0")
    ap.add_argument("--center", action="store_true", help="subtract the mean target-training feature first "
                    "(FilterConfig.center)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from neighborlt.classes import ClassesConfig, run_classes
    from neighborlt.data import load_targets
    from neighborlt.data.auxiliary import class_prototypes
    from neighborlt.data.shots import shot_groups
    from neighborlt.train.features import extract_features

    out = Path(args.out)
    run_classes(ClassesConfig(protocol=args.protocol), out)
    p = load_targets(out)
    t0 = time.perf_counter()
    f_pool = extract_features(args.model, "pretrained", p.pool, args.image_size)
    f_tt = extract_features(args.model, "pretrained", p.target_train, args.image_size)
    f_te = extract_features(args.model, "pretrained", p.target_test, args.image_size)
    secs = time.perf_counter() - t0
    L = p.target_train.num_classes
    if args.center:
        from neighborlt.filter.stage import center_features

        f_te, _ = center_features(f_te, f_tt)
        f_pool, f_tt = center_features(f_pool, f_tt)
    proto = class_prototypes(f_tt, p.target_train.labels, L)
    fp = f_pool / np.maximum(np.linalg.norm(f_pool, axis=1, keepdims=True), 1e-12)
    sim = fp @ proto.T  # [N_pool, L]
    fe = f_te / np.maximum(np.linalg.norm(f_te, axis=1, keepdims=True), 1e-12)
    own = (fe * proto[np.asarray(p.target_test.labels)]).sum(axis=1)  # the target's own (test) images: γ2 drops them
    pool_index = {cid: j for j, cid in enumerate(p.pool.class_ids)}
    shots = shot_groups(p.target_train.counts(), p.config.many, p.config.few)
    rng = np.random.default_rng(0)
    sib_s: dict[str, list[np.ndarray]] = {"all": [], "many": [], "medium": [], "few": []}
    unr_s: dict[str, list[np.ndarray]] = {k: [] for k in sib_s}
    labels = np.asarray(p.pool.labels)
    for i, cid in enumerate(p.target_train.class_ids):
        sib = [pool_index[s] for s in p.siblings.get(cid, []) if s in pool_index]
        if not sib:
            continue
        m = np.isin(labels, sib)
        unrelated = np.flatnonzero(~m)
        pick = rng.choice(unrelated, size=min(len(unrelated), int(m.sum())), replace=False)
        for g in ("all", str(shots[i])):
            sib_s[g].append(sim[m, i])
            unr_s[g].append(sim[pick, i])
    lows = [float(x) for x in args.low.split(",")]
    highs = [float(x) for x in args.high.split(",")]
    rows = []
    print(f"features: {len(p.pool) + len(p.target_train)} images in {secs:.1f} s ({args.model}, {args.image_size} px)")
    s_all, u_all = np.concatenate(sib_s["all"]), np.concatenate(unr_s["all"])
    order = np.argsort(np.concatenate([s_all, u_all]))
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    auc = (ranks[: len(s_all)].sum() - len(s_all) * (len(s_all) + 1) / 2) / (len(s_all) * len(u_all))
    print(f"AUC (a sibling image scores above an unrelated one): {auc:.3f}; centered: {args.center}")
    print(f"cosine to the parent prototype: siblings median {np.median(s_all):.3f} "
          f"(10%/90% {np.quantile(s_all, 0.1):.3f}/{np.quantile(s_all, 0.9):.3f}), unrelated median "
          f"{np.median(u_all):.3f} ({np.quantile(u_all, 0.1):.3f}/{np.quantile(u_all, 0.9):.3f})")
    print(f"own-class test images: median {np.median(own):.3f} (10%/90% {np.quantile(own, 0.1):.3f}/"
          f"{np.quantile(own, 0.9):.3f})")
    print("| γ1 | γ2 | siblings kept % | unrelated kept % | sibling share of kept % | few: siblings / unrelated % "
          "| own-class images kept % |")
    print("|---|---|---|---|---|---|---|")
    for lo in lows:
        for hi in highs:
            if lo >= hi:
                continue
            def rate(xs: list[np.ndarray], lo: float = lo, hi: float = hi) -> float:
                v = np.concatenate(xs) if xs else np.zeros(0)
                return float(((v > lo) & (v < hi)).mean() * 100) if v.size else float("nan")
            s, u = rate(sib_s["all"]), rate(unr_s["all"])
            fs, fu = rate(sib_s["few"]), rate(unr_s["few"])
            share = s / (s + u) * 100 if s + u > 0 else float("nan")
            o = rate([own])
            rows.append({"gamma_low": lo, "gamma_high": hi, "siblings_kept": s, "unrelated_kept": u,
                         "sibling_share": share, "few_siblings_kept": fs, "few_unrelated_kept": fu, "own_kept": o})
            print(f"| {lo:g} | {hi:g} | {s:.1f} | {u:.1f} | {share:.1f} | {fs:.1f} / {fu:.1f} | {o:.1f} |")
    (out / "filter_band.json").write_text(json.dumps({"model": args.model, "image_size": args.image_size,
                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
