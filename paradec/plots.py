"""The decode-order picture: canvas position against the step that committed it, think blocks
and summary coloured (as in the NAP paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path


def decode_order_png(trace: list[int], groups: list[int], path: str | Path, title: str = "",
                     summary_group: int | None = None) -> Path:
    """Writes a PNG of ``trace`` ([C] step per canvas position, -1 for headers) with each
    position coloured by ``groups`` ([C]); returns the path. ``result.trace`` and
    ``result.groups`` of a ``GenerationResult`` are such lists. summary_group: the group drawn
    as the summary; None: the last group when there are several (a ``nap`` canvas: think blocks
    0..m-1, summary m), none when there is one (the answer region of the other modes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(trace) != len(groups):
        raise ValueError(f"trace and groups must be as long, got {len(trace)} and {len(groups)}")
    if summary_group is None and len(set(groups)) > 1:
        summary_group = max(groups)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colours = plt.get_cmap("tab10")
    for g in sorted(set(groups)):
        xs = [i for i, (t, gg) in enumerate(zip(trace, groups)) if gg == g and t >= 0]
        ys = [trace[i] for i in xs]
        label = "summary" if g == summary_group else (f"think {g + 1}" if summary_group is not None else "answer")
        colour = "black" if g == summary_group else colours(g % 10)
        ax.scatter(xs, ys, s=6, color=colour, label=label)
    ax.set_xlabel("canvas position")
    ax.set_ylabel("decoding step")
    ax.set_title(title or "decode order")
    ax.legend(loc="upper left", fontsize=7, markerscale=2, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
