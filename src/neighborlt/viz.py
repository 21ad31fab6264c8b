"""``neighborlt viz RUN``: the paper's pictures of *why* auxiliary classes help, as PNGs under ``RUN/viz/``.

* ``umap.png`` (Fig. 2 / Fig. 9): UMAP (umap-learn) of penultimate features of the most-confused head/tail target
  pairs (their test images) together with their auxiliary neighbours (training images), for the raw initial
  backbone, the Balanced-CE baseline (``RUN/baseline``) and the neighbor-silencing run (``RUN/train``), side by side.
  The pairs come from the method run's confusions on the target test set: the (head, tail) pairs whose images are
  most often taken for each other.
* ``pca_rgb.png`` (Fig. 5): the top-3 principal components of a ViT's patch tokens mapped to RGB, for a few
  tail-class test images (one PCA over all shown patches). Only models with patch tokens; another model is one line.
* ``samples_per_class.png`` (Fig. 7): training images per class, sorted, for the targets alone and with the
  auxiliary classes one epoch draws (at most M per auxiliary class).

Deterministic under ``seed`` (fixed image choice, seeded UMAP, full-SVD PCA) and written atomically. The runs must
have been evaluated (``neighborlt eval``): a run without ``RUN/eval/metrics.json`` is one line.
:func:`viz_figures` returns the figures with one-sentence captions (for the report page).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .rundir import RunDir, atomic_output, read_json

log = logging.getLogger(__name__)

FIGURES = ("umap", "pca_rgb", "samples_per_class")
Figure = Literal["umap", "pca_rgb", "samples_per_class"]

CAPTIONS = {
    "umap": "UMAP of penultimate features for the most-confused head/tail target pairs (circles: their test images) "
            "and their auxiliary neighbours (crosses): look for the tail class separating from its head neighbour "
            "from raw features to Balanced-CE to neighbor silencing.",
    "pca_rgb": "The top-3 principal components of the ViT's patch tokens as RGB for tail-class test images: look for "
               "the object's patches sharing a colour distinct from the background's.",
    "samples_per_class": "Training images per class, sorted, with and without the auxiliary classes one epoch "
                         "draws: look for the tail lengthened by auxiliary classes with at most M images each.",
}


class VizConfig(BaseModel):
    """Options of ``neighborlt viz``."""

    model_config = ConfigDict(extra="forbid")

    figures: list[Figure] = Field(default_factory=lambda: list(FIGURES))  # which figures to draw
    pairs: int = Field(2, ge=1)  # most-confused head/tail pairs in the UMAP
    per_class: int = Field(40, ge=2)  # at most this many images of each shown class (first ones, fixed order)
    pca_images: int = Field(4, ge=1)  # tail-class test images in the PCA-RGB figure
    batch_size: int = Field(128, ge=1)  # images per inference batch
    seed: int = 0  # UMAP's random_state
    data_dir: str | None = None  # offline data folder; None: paths.resolve_data_dir()


class VizResult(BaseModel):
    """What :func:`run_viz` returns: written figures and the reasons for the ones skipped."""

    figures: dict[str, str] = Field(default_factory=dict)  # figure -> PNG path
    skipped: dict[str, str] = Field(default_factory=dict)  # figure -> one-line reason
    seconds: dict[str, float] = Field(default_factory=dict)  # figure -> wall seconds


def viz_figures(run_dir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """The figures of ``RUN/viz/`` that exist, in order, each with its one-sentence caption (for the report)."""
    out = []
    for name in FIGURES:
        p = Path(run_dir) / "viz" / f"{name}.png"
        if p.is_file():
            out.append((p, CAPTIONS[name]))
    return out


def run_viz(cfg: VizConfig, run_dir: str | os.PathLike[str]) -> VizResult:
    """Draw the figures of ``cfg.figures`` for a trained and evaluated run.

    Raises:
        ConfigError: a missing run, a run without training or evaluation.
    """
    import time

    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such run directory; make it with `neighborlt run` (or the stage commands)")
    rd = RunDir(root)
    for need, cmd in (("train/model.json", "train"), ("eval/metrics.json", "eval")):
        if not rd.path(need).is_file():
            raise ConfigError(f"{rd.path(need)}: not found; `neighborlt viz` draws a trained and evaluated run: run "
                              f"`neighborlt {cmd} {root}` first")
    res = VizResult()
    ctx = _Context(cfg, rd)
    for name in cfg.figures:
        t0 = time.time()
        try:
            path = {"umap": _umap, "pca_rgb": _pca_rgb, "samples_per_class": _samples}[name](ctx)
        except _Skip as e:
            res.skipped[name] = str(e)
            log.info("viz %s: %s", name, e)
            continue
        res.figures[name] = str(path)
        res.seconds[name] = round(time.time() - t0, 2)
        log.info("viz %s: %s (%.1f s)", name, path, time.time() - t0)
    return res


class _Skip(Exception):
    """A figure that does not apply to this run (one line saying why)."""


class _Context:
    """What several figures share: the run's training config, its data and the loaded models (lazily)."""

    def __init__(self, cfg: VizConfig, rd: RunDir) -> None:
        self.cfg, self.rd = cfg, rd
        self.meta = read_json(rd.path("train", "model.json"))
        rec = rd.path("records", "train.config.json")
        self.train_cfg: dict[str, Any] = read_json(rec) if rec.is_file() else {}
        self._data: Any = None

    @property
    def data(self) -> Any:
        """The run's training set as training loaded it (targets + auxiliary classes) and its target test set as its
        evaluation capped it (``max_test_per_class`` in ``eval/metrics.json``)."""
        if self._data is None:
            from .train.config import TrainConfig
            from .train.engine import load_training_data

            manifest = self.train_cfg.get("aux_manifest", "filter/aux_manifest.parquet")
            if manifest is not None and not (Path(manifest) if Path(manifest).is_absolute()
                                             else self.rd.root / manifest).is_file():
                manifest = None
            # the test images the run's evaluation saw (a quick run's cap), not the whole test split
            cap = read_json(self.rd.path("eval", "metrics.json")).get("max_test_per_class")
            tcfg = TrainConfig(data_dir=self.cfg.data_dir or self.train_cfg.get("data_dir"), aux_manifest=manifest,
                               loss="balanced_softmax", max_test_per_class=cap)
            aux, test, _ = load_training_data(tcfg, self.rd)
            self._data = (aux, test)
        return self._data

    def out(self, name: str) -> Path:
        return self.rd.path("viz", f"{name}.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _features(model: Any, image_set: Any, meta: dict[str, Any], batch_size: int) -> np.ndarray:
    """Penultimate (pooled, pre-logits) features of ``image_set`` under ``model``'s evaluation view."""
    import torch

    from .train.inference import image_batches

    model.eval()
    out = []
    with torch.no_grad():
        for x in image_batches(image_set, int(meta["image_size"]), batch_size, 0, meta.get("architecture"),
                               data_mode=meta.get("data_mode", "cache")):
            out.append(model.forward_features(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _head_tail(counts: np.ndarray, shots: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Head and tail target indices: many-/few-shot when the run has both, else the top and bottom thirds by count."""
    if shots is not None and "many" in shots and "few" in shots:
        s = np.asarray(shots)
        return np.flatnonzero(s == "many"), np.flatnonzero(s == "few")
    order = np.argsort(-counts, kind="stable")
    k = max(1, len(order) // 3)
    return np.sort(order[:k]), np.sort(order[-k:])


def _confused_pairs(ctx: _Context, test: Any, L: int) -> list[tuple[int, int]]:
    """The ``cfg.pairs`` (head, tail) target pairs most often confused by the method run (either direction)."""
    from .train.inference import predict_logits

    logits = predict_logits(ctx.rd.path("train"), test, batch_size=ctx.cfg.batch_size)[:, :L]
    pred = logits.argmax(1)
    conf = np.zeros((L, L), np.int64)
    np.add.at(conf, (np.asarray(test.labels), pred), 1)
    classes = read_json(ctx.rd.path("classes.json")).get("classes", []) if ctx.rd.path("classes.json").is_file() else []
    shots = [c.get("shot") for c in classes] if len(classes) == L else None
    aux, _ = ctx.data
    head, tail = _head_tail(np.asarray(aux.train.counts()[:L]), shots)
    scored = sorted(((int(conf[h, t] + conf[t, h]), int(h), int(t)) for h in head for t in tail if h != t),
                    key=lambda x: (-x[0], x[1], x[2]))
    return [(h, t) for _, h, t in scored[: ctx.cfg.pairs]]


def _first(labels: np.ndarray, cls: int, k: int) -> np.ndarray:
    return np.flatnonzero(labels == cls)[:k]


def _umap(ctx: _Context) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train.inference import load_trained_model
    from .train.models import create_model

    aux, test = ctx.data
    L = int(aux.num_target)
    pairs = _confused_pairs(ctx, test, L)
    if not pairs:
        raise _Skip("no head/tail target pairs in this run (one shot group only)")
    targets = sorted({c for p in pairs for c in p})
    neighbours = sorted({int(a) for t, a in np.asarray(aux.pairs).reshape(-1, 2) if int(t) in targets})
    k = ctx.cfg.per_class
    t_idx = np.concatenate([_first(np.asarray(test.labels), c, k) for c in targets])
    a_idx = np.concatenate([_first(np.asarray(aux.train.labels), c, k) for c in neighbours]) if neighbours \
        else np.zeros(0, np.int64)
    sets = [test.subset(t_idx)] + ([aux.train.subset(a_idx)] if len(a_idx) else [])
    labels = np.concatenate([np.asarray(test.labels)[t_idx], np.asarray(aux.train.labels)[a_idx]])
    names = list(aux.train.class_names)
    panels: list[tuple[str, Any, dict[str, Any]]] = []
    meta = ctx.meta
    init = str(ctx.train_cfg.get("init", meta.get("init", "random")))
    try:
        import torch

        torch.manual_seed(ctx.cfg.seed)  # a random initialisation is drawn the same way every time
        raw = create_model(str(meta["architecture"]), int(meta["num_classes"]), init=init,
                           image_size=int(meta["image_size"]))
        panels.append((f"raw features ({'random init' if init == 'random' else Path(init).name})", raw, meta))
    except Exception as e:  # noqa: BLE001 - e.g. pretrained weights that need the internet: one line on the panel
        log.info("viz umap: no raw-feature panel (%s)", " ".join(str(e).split()))
    if ctx.rd.path("baseline", "train", "model.json").is_file():
        m, bmeta = load_trained_model(ctx.rd.path("baseline", "train"))
        panels.append(("Balanced-CE (baseline)", m, bmeta))
    m, tmeta = load_trained_model(ctx.rd.path("train"))
    panels.append((f"{tmeta.get('loss', 'method')} (method)", m, tmeta))
    import umap

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colour = {c: cmap(i % 10) for i, c in enumerate(targets)}
    for c in neighbours:  # a neighbour takes its (first shown) parent's colour
        parents = [int(t) for t, a in np.asarray(aux.pairs).reshape(-1, 2) if int(a) == c and int(t) in targets]
        colour[c] = colour[parents[0]]
    for ax, (title, model, m_meta) in zip(axes[0], panels):
        feats = np.concatenate([_features(model, s, m_meta, ctx.cfg.batch_size) for s in sets])
        n = len(feats)
        emb = _umap_embed(umap, feats, max(2, min(15, n - 1)), ctx.cfg.seed)
        for c in targets + neighbours:
            sel = labels == c
            target = c < L
            ax.scatter(emb[sel, 0], emb[sel, 1], s=14 if target else 10, marker="o" if target else "x",
                       color=colour[c], alpha=0.85 if target else 0.5,
                       label=f"{names[c]}{'' if target else ' (aux)'}")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=6, loc="best", markerscale=1.2)
    pair_text = ", ".join(f"{names[h]} / {names[t]}" for h, t in pairs)
    fig.suptitle(f"Most-confused head/tail pairs: {pair_text}", fontsize=9)
    fig.tight_layout()
    return _save(fig, ctx.out("umap"))


def _umap_embed(umap: Any, feats: np.ndarray, k: int, seed: int) -> np.ndarray:
    """2-D UMAP of ``feats`` with ``k`` neighbours. Below UMAP's own exact-kNN size (4096 points) the exact neighbours
    are computed here with numpy and handed in (``precomputed_knn``): the same graph UMAP builds itself, without
    compiling its parallel numba kNN kernels (most of a fresh process's first UMAP call)."""
    import warnings

    knn: tuple[Any, ...] = (None, None, None)
    if len(feats) < 4096:
        x = np.asarray(feats, np.float64)
        sq = (x * x).sum(1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
        np.fill_diagonal(d, 0.0)
        idx = np.argsort(d, axis=1, kind="stable")[:, :k]
        knn = (idx.astype(np.int32), np.take_along_axis(d, idx, 1).astype(np.float32))
    with warnings.catch_warnings():  # no search index given: only .transform() is unavailable, which is not used
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        return umap.UMAP(n_neighbors=k, random_state=seed, init="random", n_jobs=1, n_components=2,
                         precomputed_knn=knn).fit_transform(feats)


def _patch_tokens(model: Any, x: Any) -> tuple[Any, int]:
    """Patch tokens ``[B, N, D]`` of a timm ViT and the grid side, or _Skip for models without them."""
    from timm.models.vision_transformer import VisionTransformer

    vit = getattr(model, "timm_model", model)
    if not isinstance(vit, VisionTransformer):
        raise _Skip(f"PCA-RGB needs patch tokens (a ViT); model {type(vit).__name__} has none")
    tokens = vit.forward_features(x)
    gh, _gw = vit.patch_embed.grid_size
    return tokens[:, vit.num_prefix_tokens:], int(gh)


def _pca_rgb(ctx: _Context) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.decomposition import PCA

    from .train.inference import image_batches, load_trained_model

    model, meta = load_trained_model(ctx.rd.path("train"))
    if meta.get("frozen"):
        raise _Skip("PCA-RGB needs patch tokens; a frozen-feature run keeps only a head on pooled features")
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(getattr(model, "timm_model", model), VisionTransformer):
        raise _Skip(f"PCA-RGB needs patch tokens (a ViT); model {meta.get('architecture')} has none")
    aux, test = ctx.data
    L = int(aux.num_target)
    classes = read_json(ctx.rd.path("classes.json")).get("classes", []) if ctx.rd.path("classes.json").is_file() else []
    shots = [c.get("shot") for c in classes] if len(classes) == L else None
    _, tail = _head_tail(np.asarray(aux.train.counts()[:L]), shots)
    labels = np.asarray(test.labels)
    idx = np.concatenate([_first(labels, int(c), 1) for c in tail])[: ctx.cfg.pca_images]
    if len(idx) < ctx.cfg.pca_images:  # fewer tail classes than images asked: more images of the same classes
        extra = [i for i in np.flatnonzero(np.isin(labels, tail)) if i not in set(idx.tolist())]
        idx = np.concatenate([idx, np.asarray(extra[: ctx.cfg.pca_images - len(idx)], np.int64)])
    shown = test.subset(np.sort(idx))
    size = int(meta["image_size"])
    x = torch.cat(list(image_batches(shown, size, ctx.cfg.batch_size, 0, meta.get("architecture"),
                                     data_mode=meta.get("data_mode", "cache"))))
    with torch.no_grad():
        tokens, grid = _patch_tokens(model.eval(), x)
    flat = tokens.float().reshape(-1, tokens.shape[-1]).numpy()
    comps = PCA(n_components=3, svd_solver="full").fit_transform(flat)
    comps = (comps - comps.min(0)) / np.maximum(comps.max(0) - comps.min(0), 1e-12)
    maps = comps.reshape(len(x), grid, grid, 3)
    fig, axes = plt.subplots(2, len(x), figsize=(2.2 * len(x), 4.6), squeeze=False)
    for j in range(len(x)):
        axes[0][j].imshow(np.asarray(shown.load(j).resize((size, size))))
        axes[0][j].set_title(str(shown.class_names[int(shown.labels[j])])[:18], fontsize=8)
        axes[1][j].imshow(maps[j], interpolation="nearest")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1][0].set_ylabel("patch PCA → RGB", fontsize=8)
    fig.tight_layout()
    return _save(fig, ctx.out("pca_rgb"))


def _samples(ctx: _Context) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .defaults import AUX_CAP

    aux, _ = ctx.data
    L = int(aux.num_target)
    counts = np.asarray(aux.train.counts(), dtype=np.int64)
    cap = ctx.train_cfg.get("aux_cap", AUX_CAP)
    per_epoch = np.concatenate([counts[:L], np.minimum(counts[L:], cap) if cap is not None else counts[L:]])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    orig = np.sort(counts[:L])[::-1]
    both = np.sort(per_epoch)[::-1]
    ax.plot(np.arange(len(both)) + 0.3, both, drawstyle="steps-mid", label=f"with auxiliary ({len(counts) - L} "
            f"classes, M = {cap if cap is not None else 'all'})", color="tab:orange")
    ax.plot(np.arange(len(orig)), orig, drawstyle="steps-mid", label=f"targets only ({L} classes)", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("class (sorted by images per epoch)")
    ax.set_ylabel("training images per epoch")
    ax.legend(fontsize=8)
    ax.set_title("Samples per class (Fig. 7)", fontsize=9)
    fig.tight_layout()
    return _save(fig, ctx.out("samples_per_class"))
