"""The figures of BENCHMARKS.md, drawn from its own tables (so a figure never disagrees with the
numbers beside it): generation throughput against batch, flow-decoding time against sampler steps,
and the per-device temporaries of the published configs against the number of devices.

    python benchmarks/plots.py [--benchmarks BENCHMARKS.md] [--out benchmarks/figures]

Each figure is written only when its table is in the file; the paths written are printed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIGURES = {"generation": "Generation", "decoding": "Flow decoding", "scale": "Scale"}


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """``{section title: rows}`` of the first table under each ``## `` heading (the title up to any
    `` (`` suffix), each row ``{column header: cell}``."""
    out: dict[str, list[dict[str, str]]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].split(" (")[0].strip()
        lines = [l.strip() for l in section.splitlines() if l.strip().startswith("|")]
        if len(lines) < 3 or title in out:
            continue
        cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
        head, body = cells[0], [c for c in cells[2:] if len(c) == len(cells[0])]
        out[title] = [dict(zip(head, row)) for row in body]
    return out


def _num(cell: str) -> float | None:
    try:
        return float(cell.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def _figure(size=(6.4, 4.0)):
    from titok_jax.evaluation.plots import _canvas
    return _canvas(size)


def _save(fig: Any, canvas: Any, ax: Any, path: str) -> list[str]:
    """Write the figure; returns the labels of the lines drawn."""
    from titok_jax.evaluation.images import save_png
    from titok_jax.evaluation.plots import _pixels
    fig.tight_layout()
    save_png(path, _pixels(fig, canvas))
    return [line.get_label() for line in ax.get_lines()]


def plot_generation(rows: list[dict[str, str]], path: str) -> list[str]:
    """images/s against batch, one line per (generator, steps); log-log."""
    fig, canvas = _figure()
    ax = fig.add_subplot(1, 1, 1)
    first = list(rows[0])
    for key in sorted({(r[first[0]], r["steps"]) for r in rows}):
        pts = sorted((_num(r["batch"]), _num(r["images/s"])) for r in rows
                     if (r[first[0]], r["steps"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}, {key[1]} steps")
    batches = sorted({_num(r["batch"]) for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s (tokens only)",
           title="Token generation throughput (tiny generators, CPU)")
    ax.set_xticks(batches, labels=[f"{b:g}" for b in batches])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, canvas, ax, path)


def plot_decoding(rows: list[dict[str, str]], path: str) -> list[str]:
    """milliseconds per image against sampler steps, guided and unguided, per tokenizer and batch."""
    fig, canvas = _figure()
    ax = fig.add_subplot(1, 1, 1)
    first = list(rows[0])
    for i, (name, batch) in enumerate(sorted({(r[first[0]], r["batch"]) for r in rows})):
        sel = sorted((r for r in rows if (r[first[0]], r["batch"]) == (name, batch)),
                     key=lambda r: _num(r["steps"]))
        for col, style in (("unguided images/s", "-"), ("guided images/s", "--")):
            ax.plot([_num(r["steps"]) for r in sel], [1e3 / _num(r[col]) for r in sel], style,
                    color=f"C{i}", marker="o", label=f"{name} batch {batch}, {col.split()[0]}")
    steps = sorted({_num(r["steps"]) for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="sampler steps", ylabel="ms per image",
           title="Flow decoding time (tiny tokenizers, CPU)")
    ax.set_xticks(steps, labels=[f"{s:g}" for s in steps])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, canvas, ax, path)


def plot_scale(rows: list[dict[str, str]], path: str) -> list[str]:
    """Per-device temporaries (compiled cells) against devices, accumulation 1, one line per config."""
    fig, canvas = _figure((7.0, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    names = list(dict.fromkeys(r["config"] for r in rows))
    families = list(dict.fromkeys(n.split(":")[0] for n in names))
    colours = _colours(len(names))
    for i, name in enumerate(names):
        pts = [(_num(r["devices"]), _num(r["temporaries / device"])) for r in rows
               if r["config"] == name and r["accum"] == "1" and r["how"].startswith("compile")]
        pts = [p for p in pts if p[1] is not None]
        if pts:   # one marker and line style per family, one colour per config
            f = families.index(name.split(":")[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[i], label=name,
                    marker="osD^vP"[f % 6], linestyle=("-", "--", "-.", ":")[f % 4])
    ax.set(xscale="log", yscale="log", xlabel="devices (fsdp)", ylabel="temporaries per device (GiB)",
           title="Compiled step, published batch, no accumulation")
    ax.set_xticks([8, 64, 256], labels=["8", "64", "256"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, canvas, ax, path)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


PLOTTERS = {"generation": plot_generation, "decoding": plot_decoding, "scale": plot_scale}


def write_figures(benchmarks_md: str, out_dir: str) -> dict[str, tuple[str, list[str]]]:
    """``{figure: (path, labels of its lines)}`` for each figure whose table is in the file."""
    with open(benchmarks_md, encoding="utf-8") as f:
        tables = markdown_tables(f.read())
    written = {}
    for name, title in FIGURES.items():
        if tables.get(title):
            path = os.path.join(out_dir, f"{name}.png")
            written[name] = (path, PLOTTERS[name](tables[title], path))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "figures"))
    args = parser.parse_args()
    if not os.path.isfile(args.benchmarks):
        print(f"plots: no such file {args.benchmarks}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for path, _ in write_figures(args.benchmarks, args.out).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
