"""Figures (matplotlib, PNG and PDF): heatmaps of R, accuracy on each task over the sequence, ACC/BWT/FWT bars
with CI error bars, and the MemGen trigger's insertion rate per task when runs recorded it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (CI, servers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.analysis.tables import LABELS, Analysis  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 150, "savefig.bbox": "tight"})


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def _grid(a: Analysis, w: float, h: float) -> tuple[plt.Figure, np.ndarray]:
    rows, cols = len(a.methods), len(a.orders)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")
    return fig, axes


def _n_seeds(a: Analysis, method: str, order: str) -> int:
    return sum(1 for r in a.runs if r.method == method and r.order == order)


def heatmaps(a: Analysis, out: Path) -> list[Path]:
    """One panel per (method, order): R averaged over seeds, values written in the cells."""
    fig, axes = _grid(a, 3.9, 3.0)
    for i, m in enumerate(a.methods):
        for j, o in enumerate(a.orders):
            ax = axes[i, j]
            R = a.mean_matrices.get((m, o))
            if R is None:
                ax.axis("off")
                continue
            tasks = o.split("->")
            im = ax.imshow(R, cmap="viridis", vmin=0, vmax=100, aspect="auto")
            for r in range(R.shape[0]):
                for c in range(R.shape[1]):
                    v = R[r, c]
                    ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 60 else "white", fontweight="bold" if r == c + 1 else None)
            for c in range(R.shape[1]):  # outline the cell of the task just learned (the diagonal a_{i,i})
                ax.add_patch(plt.Rectangle((c - 0.5, c + 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
            ax.set_xticks(range(len(tasks)), tasks)
            ax.set_yticks(range(len(tasks) + 1), ["init", *(f"after {t}" for t in tasks)])
            ax.set_xlabel("evaluated on")
            n = _n_seeds(a, m, o)
            ax.set_title(f"{m}, order {j + 1} ({n} seed{'s' if n > 1 else ''})")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy (%)")
    fig.suptitle("Accuracy matrix R, mean over seeds (red box: the task just learned)")
    return _save(fig, out, "heatmap")


def accuracy_lines(a: Analysis, out: Path) -> list[Path]:
    """Accuracy on each task after each stage; a marker where the task is being learned."""
    fig, axes = _grid(a, 4.0, 2.8)
    colours = {t: plt.cm.tab10(k) for k, t in enumerate(sorted(a.tasks))}
    for i, m in enumerate(a.methods):
        for j, o in enumerate(a.orders):
            ax = axes[i, j]
            R = a.mean_matrices.get((m, o))
            if R is None:
                ax.axis("off")
                continue
            tasks = o.split("->")
            x = np.arange(len(tasks) + 1)
            for c, t in enumerate(tasks):
                ax.plot(x, R[:, c], marker="o", ms=3, color=colours[t], label=t)
                ax.plot([c + 1], [R[c + 1, c]], marker="*", ms=10, color=colours[t])
            P = a.mean_probe_matrices.get((m, o))
            for k, p in enumerate(a.probes if P is not None else []):  # never trained: dashed, no learned marker
                ax.plot(x, P[:, k], ls="--", marker=".", color=plt.cm.Dark2(k % 8), label=f"probe: {p}")
            ax.set_xticks(x, ["init", *(f"after {t}" for t in tasks)], rotation=25, ha="right")
            ax.set_ylim(-3, 103)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.set_title(f"{m}, order {j + 1}: {' → '.join(tasks)}", fontsize=9)
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="task (★ = learned; dashed: probe)")
    fig.suptitle("Accuracy on each task over the sequence (mean over seeds)")
    return _save(fig, out, "accuracy_over_sequence")


def metric_bars(a: Analysis, out: Path, keys: tuple[str, ...] = ("acc", "bwt", "fwt")) -> list[Path]:
    """ACC/BWT/FWT per method with asymmetric 95% bootstrap CI error bars."""
    t = a.tidy[a.tidy.task == "all"]
    methods = a.methods
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(keys), 3.4), layout="constrained")
    for k, m in enumerate(methods):
        sub = t[t.method == m].set_index("metric")
        mean = np.array([sub.loc[key, "mean"] for key in keys], dtype=float)
        lo = np.array([sub.loc[key, "ci_low"] for key in keys], dtype=float)
        hi = np.array([sub.loc[key, "ci_high"] for key in keys], dtype=float)
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))  # (2, len(keys))
        xs = np.arange(len(keys)) + (k - (len(methods) - 1) / 2) * width
        bars = ax.bar(xs, np.nan_to_num(mean), width, yerr=err, capsize=3, label=m)
        for x, v, low, h in zip(xs, mean, lo, hi, strict=True):  # value just beyond the end of its error bar
            up = np.isnan(v) or v >= 0
            end = np.nan_to_num(h if up else low, nan=np.nan_to_num(v))
            ax.annotate("n/a" if np.isnan(v) else f"{v:.1f}", (x, end), xytext=(0, 3 if up else -10),
                        textcoords="offset points", ha="center", fontsize=7, color=bars.patches[0].get_facecolor())
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.12)  # room for the value labels beyond the error bars
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys])
    ax.set_ylabel("percentage points")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, ncols=min(4, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    n_runs = int(t["n_runs"].max()) if len(t) else 0
    ax.set_title(f"CL metrics, mean ± {int(a.level * 100)}% bootstrap CI (up to {n_runs} runs per method)")
    return _save(fig, out, "metrics_bars")


def trigger_rates(a: Analysis, out: Path) -> list[Path]:
    """Insertion rate (% of queried delimiters where the trigger inserted latents) per task, mean over rows and
    runs; empty when no run recorded trigger decisions."""
    data = {(r.method, t): v for r in a.runs for t, v in r.trigger.items()}
    if not data:
        return []
    methods = [m for m in a.methods if any(k[0] == m for k in data)]
    tasks = a.tasks
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(tasks), 3.0), layout="constrained")
    for k, m in enumerate(methods):
        vals = []
        for t in tasks:
            rates = [np.nanmean(r.trigger[t]) for r in a.runs if r.method == m and t in r.trigger]
            vals.append(float(np.mean(rates)) if rates else np.nan)
        xs = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(vals), width, label=m)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("insertion rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False)
    ax.set_title("Trigger insertion rate per task (mean over rows and runs)")
    return _save(fig, out, "trigger_rate")


def all_plots(a: Analysis, out: Path) -> list[Path]:
    return [*heatmaps(a, out), *accuracy_lines(a, out), *metric_bars(a, out), *trigger_rates(a, out)]
