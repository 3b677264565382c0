"""What `method: select` chose and what changed, for the run card: summary rows, a layers x module types table and
a PNG heat map (importance, selected, relative change ‖ΔW‖ / ‖W‖). Everything reads the dict Select.selection()
returns (also written as selection.json)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

SELECTION_FILE = "selection.json"
SELECTION_PNG = "selection.png"


def _grid(info: dict, field: str) -> tuple[list[int], list[str], list[list]]:
    """(layers, module types, rows[layer][module] = group[field] or None), modules in model order."""
    layers = sorted({g["layer"] for g in info["groups"]})
    modules = list(dict.fromkeys(g["module"] for g in info["groups"]))
    rows = [[None] * len(modules) for _ in layers]
    for g in info["groups"]:
        rows[layers.index(g["layer"])][modules.index(g["module"])] = g[field]
    return layers, modules, rows


def summary_rows(info: dict) -> dict[str, str]:
    m, groups = info["method"], info["groups"]
    chosen = [g for g in groups if g["selected"]]
    how = m["strategy"]
    if info["scoring"]:
        how += (f"; scores: {m['importance']} ({m['normalize']} per group) on {info['scoring']['batches']} "
                f"micro-batches, {info['scoring']['seconds']:.0f} s")
    per_module = ", ".join(f"{k} {v}" for k, v in Counter(g["module"] for g in chosen).most_common())
    layers = sorted({g["layer"] for g in chosen})
    rows = {
        "Selection": how,
        "Selected groups": f"{len(chosen)} of {len(groups)} (layer x module); {per_module}; layers "
                           f"{', '.join(map(str, layers))}",
        "Selected parameters": f"{info['trained_params']:,} of {info['all_groups_params']:,} "
                               f"({100 * info['trained_params'] / info['all_groups_params']:.1f}%; budget "
                               f"{info['budget']:,}" + (f", LoRA r={m['lora_r']}" if m["lora_r"] else ", full rank")
                               + ")",
    }
    changes = sorted((g["relative_change"], g["key"]) for g in chosen if g["relative_change"] is not None)
    if changes:
        median = changes[len(changes) // 2][0]
        rows["Relative change of the selected groups"] = (f"‖ΔW‖/‖W‖: median {median:.2e}, max {changes[-1][0]:.2e} "
                                                          f"({changes[-1][1]}), min {changes[0][0]:.2e}")
    rows["Heat map"] = f"`{SELECTION_PNG}` (layers x module types), every group in `{SELECTION_FILE}`"
    return rows


def group_table(info: dict) -> str:
    """Markdown: one row per layer, one column per module type; cell = score, selected groups in bold with their
    relative change."""
    layers, modules, scores = _grid(info, "score")
    _, _, selected = _grid(info, "selected")
    _, _, changes = _grid(info, "relative_change")
    lines = ["## Parameter groups", "",
             "Score per group (" + (f"{info['method']['importance']}, {info['method']['normalize']}"
                                    if info["scoring"] else "not scored") +
             "); **bold** = selected (trained), with its relative change ‖ΔW‖/‖W‖ after training.", "",
             "| layer | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]
    for li, layer in enumerate(layers):
        cells = []
        for mi in range(len(modules)):
            s, sel, ch = scores[li][mi], selected[li][mi], changes[li][mi]
            text = "-" if s is None else f"{s:.2e}"
            if sel:
                text = f"**{text if s is not None else 'selected'}**" + (f" ({ch:.1e})" if ch is not None else "")
            cells.append(text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_heatmap(info: dict, path: Path) -> bool:
    """Three heat maps over layers x module types: log10 score, selected, log10 relative change. False (and no
    file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print(f"[tunekit] matplotlib not installed: no {SELECTION_PNG} (pip install 'tunekit[plot]')", flush=True)
        return False
    layers, modules, scores = _grid(info, "score")
    _, _, selected = _grid(info, "selected")
    _, _, changes = _grid(info, "relative_change")
    log = lambda rows: np.array([[math.log10(v) if v else np.nan for v in r] for r in rows], dtype=float)  # noqa: E731
    m = info["method"]
    panels = [(log(scores), f"log10 importance ({m['importance']}, {m['normalize']})", "viridis"),
              (np.array(selected, dtype=float), f"selected ({m['strategy']}): "
               f"{sum(g['selected'] for g in info['groups'])} groups", "Greys"),
              (log(changes), "log10 ‖ΔW‖ / ‖W‖ after training", "magma")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 2 + 0.22 * len(layers)))
    for ax, (data, title, cmap) in zip(axes, panels):
        empty = bool(np.isnan(data).all())
        if empty:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        colors = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")  # grey: not scored / not trained
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=colors, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(modules)), modules, rotation=60, fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_ylabel("decoder layer")
        if cmap != "Greys" and not empty:
            fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
