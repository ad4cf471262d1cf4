"""What every benchmark writes: its figures as JSON and a line plot a person can look at."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"


def save(name: str, data: dict[str, Any], series: dict[str, dict[int, float]], **axes: Any) -> None:
    """benchmarks/results/{name}.json and {name}.png (one line per series; axes: matplotlib set())."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        ax.plot(list(points), list(points.values()), marker="o", label=label)
    ax.set(**axes)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=100)
    print(f"wrote {OUT / name}.json and {OUT / name}.png")


def median_of(runs: int, f: Callable[[], float], label: str) -> float:
    """The median of `runs` calls of f (a tok/s figure), each printed as it comes."""
    vals = []
    for r in range(runs):
        vals.append(f())
        print(f"  {label}: run {r + 1}/{runs}: {vals[-1]:.1f} tok/s", flush=True)
    return statistics.median(vals)
