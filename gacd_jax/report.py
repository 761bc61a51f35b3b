"""Readable output: markdown tables and PNG plots."""

import os
from typing import Sequence


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """A GitHub markdown table from a list of dicts (columns default to the first row's keys)."""
  if not rows:
    return ""
  columns = list(columns or rows[0].keys())
  cells = [[str(row.get(c, "")) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  def line(values):
    return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
  out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in cells]
  return "\n".join(out)


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                *, xlabel: str, ylabel: str, title: str = "", x_scale: float = 1.0) -> None:
  """One line per entry of `curves` (`name -> (x values, y values)`), written as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, (xs, ys) in curves.items():
    ax.plot([x * x_scale for x in xs], ys, marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_bars(groups: dict[str, dict[str, Sequence[float]]], path: str | os.PathLike, *,
              ylabel: str, title: str = "") -> None:
  """Grouped bars with error bars, written as a PNG: one group per key of `groups`
  (`name -> {series: values}`), one bar per series at the mean of its values, the error bar one
  sample standard deviation. A series without values is left out of its group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = list(groups)
  series = list(dict.fromkeys(s for g in groups.values() for s in g))
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5), dpi=120)
  for k, s in enumerate(series):
    xs, means, stds = [], [], []
    for i, name in enumerate(names):
      values = np.asarray(groups[name].get(s, []), float)
      if values.size:
        xs.append(i + (k - (len(series) - 1) / 2) * width)
        means.append(values.mean())
        stds.append(values.std(ddof=1) if values.size > 1 else 0.0)
    ax.bar(xs, means, width, yerr=stds, capsize=2, label=s)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3, axis="y")
  # Beside the axes, not over the bars.
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str],
                 column_labels: Sequence[str], path: str | os.PathLike, *, title: str = "",
                 vmin: float = 0.0, vmax: float = 1.0) -> None:
  """A heatmap of `values` [rows][columns], each cell annotated with its value, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  grid = np.asarray(values, dtype=float)
  fig, ax = plt.subplots(figsize=(1.6 * len(column_labels) + 2, 0.5 * len(row_labels) + 2),
                         dpi=120)
  image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(column_labels)), column_labels, rotation=20, ha="right")
  ax.set_yticks(range(len(row_labels)), row_labels)
  midpoint = (vmin + vmax) / 2
  for (i, j), value in np.ndenumerate(grid):
    # Dark text on the bright end of viridis, light text on the dark end.
    ax.text(j, i, f"{value:.2f}", ha="center", va="center",
            color="black" if value > midpoint else "white")
  fig.colorbar(image, ax=ax)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
