"""The report's matplotlib figures, one function per figure: the data in, PNG bytes out (Agg, drawn by
:func:`neighborlt.report.blocks.figure_png`). Every file string on a figure goes through
:func:`~neighborlt.report.blocks.mpl_text`, so that a class name is never parsed as mathtext."""

from __future__ import annotations

from typing import Any

from .blocks import figure_png, mpl_text
from .inputs import SPLITS, epoch_value

SHOT_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
WHERE_COLOURS = {"correct": "#2ca02c", "other_target": "#9a9a9a", "paired_aux": "#ff7f0e",
                 "unpaired_aux": "#9467bd", "aux": "#9467bd"}
WHERE_LABELS = {"correct": "correct", "other_target": "other target", "paired_aux": "paired auxiliary",
                "unpaired_aux": "unpaired auxiliary", "aux": "auxiliary (pairs unknown)"}


def profile_png(rows: list[dict[str, Any]], counts: list[int], shots: list[str], th: dict[str, Any],
                dpi: int) -> bytes:
    """Training images per target class (log scale), coloured by split, with the many / few thresholds."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        x = list(range(len(rows)))
        ax.bar(x, [max(c, 0.8) for c in counts], width=0.85 if len(rows) < 200 else 1.0,
               color=[SHOT_COLOURS.get(s, "0.5") for s in shots], linewidth=0)
        ax.set_yscale("log")
        for name, t in (("many", th.get("many")), ("few", th.get("few"))):
            if t:
                ax.axhline(t, color="0.4", lw=0.8, ls="--")
                ax.text(len(rows) - 0.45, t, f"{name} threshold {t}", va="bottom", ha="right", fontsize=8,
                        color="0.3")
        if len(rows) <= 40:
            ax.set_xticks(x)
            ax.set_xticklabels([mpl_text(r["name"], 18) for r in rows], rotation=45 if len(rows) > 6 else 0,
                               ha="right" if len(rows) > 6 else "center", fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(rows)} classes, most to fewest training images")
        ax.set_ylabel("training images (log scale)")
        from matplotlib.patches import Patch

        present = [s for s in SPLITS if s in shots]
        ax.legend(handles=[Patch(color=SHOT_COLOURS[s], label=f"{s} ({shots.count(s)} classes)") for s in present],
                  loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(present), fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlim(-0.6, len(rows) - 0.4)

    return figure_png(draw, (9.0, 3.8), dpi)


def splits_png(series: list[tuple[str, dict[str, Any], str]], keys: tuple[str, ...], dpi: int) -> bytes:
    """Grouped bars of overall / many / medium / few top-1 accuracy, one colour per ``(label, metrics, colour)``."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / len(series)
        for j, (label, met, colour) in enumerate(series):
            for i, k in enumerate(keys):
                x = i - 0.4 + width * (j + 0.5)
                v = met.get(k)
                if v is None:
                    ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=8, color="0.4")
                    continue
                ax.bar(x, v, width=width * 0.92, color=colour, label=mpl_text(label, 60) if i == 0 else None)
                ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys)
        ax.set_ylim(0, 105)
        ax.set_ylabel("top-1 accuracy (%)")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    return figure_png(draw, (8.0, 3.8), dpi)


def per_class_png(rows: list[dict[str, Any]], base: dict[int, dict[str, Any]], th: dict[str, Any], dpi: int) -> bytes:
    """Per-class accuracy against training images (log scale): the method by split, the baseline as rings joined by
    a line per class."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            br = base.get(r["index"])
            if br and br["accuracy"] is not None and r["accuracy"] is not None:
                x = max(r["train_count"], 1)
                ax.plot([x, x], [br["accuracy"], r["accuracy"]], color="0.75", lw=0.8, zorder=1)
        if base:
            pts = [r for r in base.values() if r["accuracy"] is not None]
            ax.scatter([max(r["train_count"], 1) for r in pts], [r["accuracy"] for r in pts], s=22,
                       facecolors="none", edgecolors="0.45", label="baseline", zorder=2)
        for s in SPLITS:
            pts = [r for r in rows if r["shot"] == s and r["accuracy"] is not None]
            if pts:
                ax.scatter([max(r["train_count"], 1) for r in pts], [r["accuracy"] for r in pts], s=22,
                           color=SHOT_COLOURS[s], label=f"method, {s}", zorder=3)
        if len(rows) <= 12:
            for r in rows:
                if r["accuracy"] is not None:
                    ax.annotate(mpl_text(r["name"], 16), (max(r["train_count"], 1), r["accuracy"]), fontsize=7,
                                xytext=(4, 3), textcoords="offset points", color="0.25")
        ax.set_xscale("log")
        for t in (th.get("few"), th.get("many")):
            if t:
                ax.axvline(t, color="0.7", lw=0.8, ls="--")
        ax.set_ylim(-3, 103)
        ax.set_xlabel("training images (log scale; 0 shown at 1)")
        ax.set_ylabel("top-1 accuracy (%)")
        if any(r["accuracy"] is not None for r in rows):
            ax.legend(loc="best", fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    return figure_png(draw, (8.0, 4.2), dpi)


def where_png(groups: list[tuple[str, dict[str, Any]]], kinds: list[str], dpi: int) -> bytes:
    """Stacked bars of where the joint model's top-1 falls, one bar per group of target test images."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ys = list(range(len(groups)))[::-1]
        for y, (_, sh) in zip(ys, groups):
            left = 0.0
            for k in kinds:
                v = float(sh.get(k) or 0.0)
                ax.barh(y, v, left=left, color=WHERE_COLOURS[k], height=0.6,
                        label=WHERE_LABELS[k] if y == ys[0] else None)
                if v >= 6:
                    ax.text(left + v / 2, y, f"{v:.0f}%", ha="center", va="center", fontsize=8, color="white")
                left += v
        ax.set_yticks(ys)
        ax.set_yticklabels([g for g, _ in groups])
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of target test images (%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    return figure_png(draw, (8.0, 1.2 + 0.55 * len(groups)), dpi)


def funnel_png(stages: list[str], total: dict[str, Any], dpi: int) -> bytes:
    """Horizontal bars of the images left after each stage of the acquisition funnel."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        vals = [float(total.get(s) or 0) for s in stages]
        ys = list(range(len(stages)))[::-1]
        ax.barh(ys, vals, color=["#1f77b4" if s != "kept" else "#2ca02c" for s in stages], height=0.65)
        top = max(vals) if vals else 1.0
        for y, v in zip(ys, vals):
            ax.text(v + top * 0.01, y, f"{int(v)}", va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels([mpl_text(s, 20) for s in stages])
        ax.set_xlim(0, top * 1.12 or 1)
        ax.set_xlabel("auxiliary images")
        ax.spines[["top", "right"]].set_visible(False)

    return figure_png(draw, (8.0, 0.8 + 0.38 * len(stages)), dpi)


def curves_png(rows: list[dict[str, Any]], brows: list[dict[str, Any]], has_test: bool, dpi: int) -> bytes:
    """Training loss (the baseline's dashed), learning rate and, when evaluated more than once, test top-1 per epoch."""

    panels = 3 if has_test else 2

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, panels)
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [epoch_value(r, "loss") for r in rows], marker="o", ms=3, color="#1f77b4", label="method")
        if brows:
            axes[0].plot([r["epoch"] for r in brows], [epoch_value(r, "loss") for r in brows], ls="--", color="0.5",
                         label="baseline")
            axes[0].legend(fontsize=8, frameon=False)
        axes[0].set_title("training loss", fontsize=10)
        axes[1].plot(ep, [epoch_value(r, "lr") for r in rows], color="#8c564b")
        axes[1].set_title("learning rate", fontsize=10)
        if has_test:
            ax = axes[2]
            for k, colour in (("overall", "black"), *((s, SHOT_COLOURS[s]) for s in SPLITS)):
                pts = [(r["epoch"], r["test"].get(k)) for r in rows
                       if isinstance(r.get("test"), dict) and r["test"].get(k) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colour, label=k)
            ax.set_ylim(0, 100)
            ax.set_title("test top-1 (%)", fontsize=10)
            ax.legend(fontsize=7, frameon=False)
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.spines[["top", "right"]].set_visible(False)

    return figure_png(draw, (10.0, 3.2), dpi)
