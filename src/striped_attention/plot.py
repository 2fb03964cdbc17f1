"""Pictures for `bench` and `simulate`: the per-rank timeline of a ring, and speedup against ring size.

matplotlib is optional (``pip install striped-attention[plot]``); it is imported only when a picture is
drawn, with the Agg backend, so nothing here needs a display.

Both pictures read the plain data the tools produce. A timeline is, per layout, one list per rank of step
records ``{"pass": "forward" | "backward", "step": int, "source": int, "compute_ms": float, "wait_ms": float}``
in the order the rank ran them (the ``steps`` of :class:`striped_attention.bench.Result`).
"""

from __future__ import annotations

__all__ = ["timeline", "speedup"]

COLOURS = {"forward": "#1f77b4", "backward": "#2ca02c", "wait": "#d62728"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "drawing needs matplotlib: pip install 'striped-attention[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timeline(panels: dict[str, list[list[dict]]], path: str, *, title: str = "", unit: str = "ms") -> None:
    """Draw one panel per layout, one row per rank, ring steps along time; save a PNG to ``path``.

    panels: layout name (the panel's title) -> per rank, the step records in order (see module doc).
    Each step is a bar of compute (coloured by pass) followed by a bar of waiting for the next block,
    so ranks that finish their block early show a long red tail: the imbalance.
    """
    if not panels:
        raise ValueError("nothing to draw: no panels")
    plt = _pyplot()
    from matplotlib.patches import Patch

    ranks = max(len(per_rank) for per_rank in panels.values())
    height = 0.9 + len(panels) * (0.35 * ranks + 0.8)  # inches
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, figsize=(10, height), layout="constrained")
    for ax, (name, per_rank) in zip(axes[:, 0], panels.items()):
        end = 0.0
        for rank, steps in enumerate(per_rank):
            t = 0.0
            for s in steps:
                ax.barh(rank, s["compute_ms"], left=t, height=0.7, color=COLOURS[s["pass"]], edgecolor="white",
                        linewidth=0.5)
                ax.barh(rank, s["wait_ms"], left=t + s["compute_ms"], height=0.7, color=COLOURS["wait"],
                        alpha=0.6, linewidth=0)
                t += s["compute_ms"] + s["wait_ms"]
            end = max(end, t)
        ax.set_title(f"{name}: {end:.1f} {unit}", loc="left", fontsize=10)
        ax.set_yticks(range(len(per_rank)), [f"rank {r}" for r in range(len(per_rank))])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"time ({unit}); each bar is one ring step")
    passes = sorted({s["pass"] for per_rank in panels.values() for steps in per_rank for s in steps}, reverse=True)
    handles = [Patch(color=COLOURS[p], label=f"compute ({p})") for p in passes]
    handles.append(Patch(color=COLOURS["wait"], alpha=0.6, label="waiting for the next block"))
    fig.legend(handles=handles, loc="outside upper right", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup(series: dict[str, dict[int, float]], path: str, *, title: str = "", ideal: bool = True) -> None:
    """Speedup over contiguous against the number of ranks N; save a PNG to ``path``.

    series: label -> {N: speedup}. ``ideal`` adds the theoretical (2N - 1) / N of balanced layouts.
    """
    if not series:
        raise ValueError("nothing to draw: no series")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    sizes = sorted({n for points in series.values() for n in points})
    if ideal:
        ax.plot(sizes, [(2 * n - 1) / n for n in sizes], "k--", label="ideal (2N-1)/N")
    for label, points in series.items():
        ns = sorted(points)
        ax.plot(ns, [points[n] for n in ns], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("ranks N")
    ax.set_ylabel("speedup over contiguous")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
