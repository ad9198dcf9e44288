"""Plot the ratios of every benchmark JSON in ``benchmarks/results/`` (one PNG each).

Every number whose key, or whose parent's key, mentions "ratio" is drawn as a
horizontal bar against the 1.0x line, labelled with its path in the JSON.

Usage: ``python benchmarks/plot_results.py [--results benchmarks/results]``
(needs matplotlib: ``pip install '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any


def ratios(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, float]]:
    """``(label, value)`` for every ratio in a benchmark's JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from ratios(value, (*path, str(key)))
    elif isinstance(node, int | float) and not isinstance(node, bool):
        if any("ratio" in part for part in path[-2:]):
            yield " / ".join(p for p in path if "ratio" not in p) or path[-1], float(node)


def plot(json_path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        items = list(ratios(json.load(f)))
    if not items:
        return None
    labels, values = zip(*items, strict=True)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(items) + 1.2))
    colors = ["tab:green" if v <= 1.0 else "tab:orange" for v in values]
    ax.barh(range(len(items)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (below 1.0: ours is faster)")
    ax.set_title(os.path.basename(json_path))
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    out = json_path[: -len(".json")] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), "results")
    parser.add_argument("--results", default=default)
    args = parser.parse_args()
    for name in sorted(os.listdir(args.results)):
        if name.endswith(".json"):
            out = plot(os.path.join(args.results, name))
            if out:
                print(f"wrote {out}")


if __name__ == "__main__":
    main()
