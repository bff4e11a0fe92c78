"""Plots of a run: training curves, the codebook's sorted usage histogram and PSNR against the
number of tokens decoded. Pure functions: records or arrays in, an image out - ``render_*`` give a
uint8 ``[H, W, 3]`` array (which a task returns as an evaluation image), ``plot_*`` write it as a
PNG with ``images.save_png`` (a temporary file renamed over the destination, so a failed write
leaves no half file) and return the path.

Drawn on matplotlib's Agg canvas, without pyplot (no display, no global figure state); matplotlib
is imported inside the functions, so importing ``titok_jax`` does not import it. Every figure is
``FIGURE_DPI`` dots per inch and exactly ``figsize x FIGURE_DPI`` pixels (no tight bounding box).

``try_plot(what, fn, ...)`` is how a run calls them: a plot that fails (a read-only workdir, a
missing font, anything) is a :class:`~titok_jax.errors.WriteWarning` and ``None``, never an
exception that stops training or evaluation.

Curves (``curve_series``): ``metrics.jsonl`` rows (``"train"``) and ``eval.jsonl`` rows
(``"eval"``) against their ``step``; one panel per quantity in :data:`CURVE_PANELS` that the rows
hold (loss, PSNR with the same-bit thumbnail baseline, codebook usage, token accuracy, rFID).
Missing, null and non-finite values (``MetricWriter`` writes NaN as null, +-inf as +-1e30) are
left out.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from titok_jax.errors import WriteWarning
from titok_jax.evaluation.images import save_png

__all__ = ["CURVE_PANELS", "CURVES_FILE", "FIGURE_DPI", "curve_series", "read_jsonl", "render_curves",
           "plot_curves", "write_curves", "render_codebook_histogram", "plot_codebook_histogram",
           "render_psnr_vs_tokens", "plot_psnr_vs_tokens", "try_plot"]

FIGURE_DPI = 100
PANEL_SIZE = (4.2, 3.2)        # inches per curves panel: 420 x 320 pixels
HISTOGRAM_SIZE = (6.4, 3.6)    # 640 x 360 pixels
PSNR_TOKENS_SIZE = (5.2, 3.6)  # 520 x 360 pixels
CURVES_FILE = "curves.png"

# (title, y label, log y allowed, ((source, key, legend label), ...)); source "train" is
# metrics.jsonl, "eval" is eval.jsonl. A panel is drawn when one of its series has a point.
CURVE_PANELS: tuple[tuple[str, str, bool, tuple[tuple[str, str, str], ...]], ...] = (
    ("loss", "loss", True, (("train", "loss", "train"), ("eval", "loss", "held-out"))),
    ("PSNR", "dB", False, (("eval", "psnr", "held-out"),
                           ("eval", "thumbnail_psnr", "same-bit thumbnail"))),
    ("codebook usage", "fraction of codes used", False,
     (("eval", "codebook_usage", "held-out split"), ("train", "quantizer/usage", "train"))),
    ("token accuracy", "accuracy", False,
     (("eval", "masked_accuracy", "held-out (masked)"), ("eval", "next_token_accuracy", "held-out (next)"),
      ("train", "masked_accuracy", "train (masked)"), ("train", "next_token_accuracy", "train (next)"))),
    ("rFID", "rFID", False, (("eval", "rfid", "held-out"),)),
)


def _canvas(size: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` of ``size`` inches on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=FIGURE_DPI)
    return fig, FigureCanvasAgg(fig)


def _pixels(fig: Any, canvas: Any) -> np.ndarray:
    """The rendered figure as uint8 ``[H, W, 3]`` (white background)."""
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e30


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file, one per line; a missing file is ``[]`` and lines that
    are not a JSON object (a half-written last line) are skipped."""
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        return []
    return rows


def curve_series(metrics_rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train/loss": (steps, values), "eval/psnr": ...}`` for every series of
    :data:`CURVE_PANELS` with at least one finite point, sorted by step (a step logged twice, as
    after a resume, keeps its last value)."""
    sources = {"train": metrics_rows, "eval": eval_rows}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _, _, _, series in CURVE_PANELS:
        for source, key, _ in series:
            points: dict[int, float] = {}
            for row in sources[source]:
                step, value = row.get("step"), row.get(key)
                if isinstance(step, int) and _finite(value):
                    points[step] = float(value)
            if points:
                steps = np.asarray(sorted(points), np.int64)
                out[f"{source}/{key}"] = (steps, np.asarray([points[s] for s in steps], np.float64))
    return out


def render_curves(metrics_rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]]
                  ) -> tuple[np.ndarray, list[str]]:
    """``(image, series drawn)``: one panel per :data:`CURVE_PANELS` entry with data, side by side
    (``420 n x 320`` pixels for ``n`` panels) over the same step range. A loss spanning more than
    a factor 20 and all positive is drawn on a log axis. ``ValueError`` when the rows hold no
    series at all."""
    data = curve_series(metrics_rows, eval_rows)
    panels = [(title, ylabel, logy, [(f"{s}/{k}", label) for s, k, label in series if f"{s}/{k}" in data])
              for title, ylabel, logy, series in CURVE_PANELS]
    panels = [p for p in panels if p[3]]
    if not panels:
        raise ValueError("no training or evaluation curves to plot (no loss, PSNR, usage or accuracy)")
    from matplotlib.ticker import MaxNLocator

    fig, canvas = _canvas((PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]))
    drawn: list[str] = []
    lo = min(int(steps[0]) for steps, _ in data.values())   # one step axis for every panel
    hi = max(int(steps[-1]) for steps, _ in data.values())
    pad = max(1.0, 0.03 * (hi - lo))
    for i, (title, ylabel, logy, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = []
        for name, label in series:
            steps, ys = data[name]
            few = len(steps) <= 30
            ax.plot(steps, ys, label=label, linewidth=1.2, marker="o" if few else None,
                    markersize=3, linestyle="--" if "thumbnail" in name else "-")
            values.append(ys)
            drawn.append(name)
        allv = np.concatenate(values)
        if logy and allv.min() > 0 and allv.max() / allv.min() > 20:
            ax.set_yscale("log")
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # steps are whole numbers
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.08 / len(panels) + 0.04, right=0.98, bottom=0.16, top=0.9,
                        wspace=0.35)
    return _pixels(fig, canvas), drawn


def plot_curves(metrics_rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
                path: str | os.PathLike) -> list[str]:
    """``render_curves`` written to ``path``; returns the series drawn (``"train/loss"``, ...)."""
    image, drawn = render_curves(metrics_rows, eval_rows)
    save_png(path, image)
    return drawn


def write_curves(workdir: str | os.PathLike) -> str | None:
    """``WORKDIR/curves.png`` from ``metrics.jsonl`` and ``eval.jsonl``; returns its path, or None
    (nothing written) when the workdir has no training log (an imported model) or no curve."""
    metrics_rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    eval_rows = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    if not metrics_rows or not curve_series(metrics_rows, eval_rows):
        return None
    path = os.path.join(os.fspath(workdir), CURVES_FILE)
    plot_curves(metrics_rows, eval_rows, path)
    return path


def render_codebook_histogram(counts: Any, codebook_size: int | Sequence[int] | None = None) -> np.ndarray:
    """The per-code counts of an evaluation (``[K]``, or ``[F, K]`` for ``F`` sub-codebooks, as
    ``evaluation.codebook``) sorted from the most used code down, against the code's rank; the
    title gives the codes used, their fraction and the perplexity ``exp(H)``. Bars for ``K <= 256``,
    else a filled step curve on a log rank axis; a log count axis when the counts of the used codes
    span more than a factor 20. ``640 x 360`` pixels."""
    counts = np.asarray(counts)
    if counts.ndim not in (1, 2) or counts.shape[-1] == 0:
        raise ValueError(f"counts must be [K] or [F, K], got shape {counts.shape}")
    rows = counts.reshape(-1, counts.shape[-1]).astype(np.int64)
    sizes = np.broadcast_to(np.asarray(counts.shape[-1] if codebook_size is None else codebook_size,
                                       np.int64), (rows.shape[0],))
    fig, canvas = _canvas(HISTOGRAM_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    titles = []
    for f, (row, k) in enumerate(zip(rows, sizes)):
        c = np.sort(row[:int(k)])[::-1]
        used = int(np.sum(c > 0))
        p = c[c > 0] / max(int(c.sum()), 1)
        perplexity = float(np.exp(-np.sum(p * np.log(p)))) if used else 0.0
        label = f"codebook {f}" if rows.shape[0] > 1 else None
        ranks = np.arange(1, int(k) + 1)
        heights = np.where(c > 0, c, np.nan)  # unused codes: no bar (a log axis has no 0)
        if k <= 256 and rows.shape[0] == 1:
            ax.bar(ranks, heights, width=1.0, color="tab:blue", label=label)
        else:
            ax.fill_between(ranks, heights, step="mid", alpha=0.4 if rows.shape[0] > 1 else 0.8,
                            label=label)
            ax.set_xscale("log")
        titles.append(f"{used}/{int(k)} codes used ({100.0 * used / int(k):.1f}%), "
                      f"perplexity {perplexity:.1f}")
    used_counts = rows[rows > 0]
    if used_counts.size and used_counts.max() / used_counts.min() > 20:
        ax.set_yscale("log")
    ax.set_xlim(0.5, float(sizes.max()) + 0.5)
    ax.set_title("codebook usage: " + titles[0] if len(titles) == 1 else
                 f"codebook usage of {len(titles)} codebooks", fontsize=10)
    ax.set_xlabel("code rank (most used first)", fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if rows.shape[0] > 1:
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.14, top=0.9)
    return _pixels(fig, canvas)


def plot_codebook_histogram(counts: Any, path: str | os.PathLike,
                            codebook_size: int | Sequence[int] | None = None) -> str:
    """``render_codebook_histogram`` written to ``path``; returns the path."""
    save_png(path, render_codebook_histogram(counts, codebook_size))
    return os.fspath(path)


def render_psnr_vs_tokens(num_tokens: Sequence[int], psnr: Sequence[float],
                          num_images: int | None = None) -> np.ndarray:
    """PSNR (dB) of the same images decoded from their first ``k`` tokens, against ``k`` on a
    log-2 axis (one point per ``k``). ``520 x 360`` pixels."""
    ks = np.asarray(num_tokens, np.int64)
    ys = np.asarray(psnr, np.float64)
    if ks.ndim != 1 or ks.shape != ys.shape or ks.size == 0 or ks.min() < 1:
        raise ValueError(f"need one PSNR per token count >= 1, got {ks.shape} and {ys.shape}")
    fig, canvas = _canvas(PSNR_TOKENS_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, ys, marker="o", linewidth=1.5)
    if ks.max() > ks.min():
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    for k, y in zip(ks, ys):
        ax.annotate(f"{y:.1f}", (k, y), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.set_title("reconstruction PSNR vs tokens decoded" + (f" ({num_images} images)" if num_images else ""),
                 fontsize=10)
    ax.set_xlabel("tokens decoded (first k)", fontsize=9)
    ax.set_ylabel("PSNR (dB)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    return _pixels(fig, canvas)


def plot_psnr_vs_tokens(num_tokens: Sequence[int], psnr: Sequence[float], path: str | os.PathLike,
                        num_images: int | None = None) -> str:
    """``render_psnr_vs_tokens`` written to ``path``; returns the path."""
    save_png(path, render_psnr_vs_tokens(num_tokens, psnr, num_images))
    return os.fspath(path)


def try_plot(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or None with a :class:`WriteWarning` naming ``what`` when it raises
    (any ``Exception``): a picture is never worth a failed run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - pictures are advice; the run goes on
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        warnings.warn(WriteWarning(f"could not draw {what}{where}: {reason}"), stacklevel=2)
        return None
