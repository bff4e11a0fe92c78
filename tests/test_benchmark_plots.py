"""``benchmarks/plots.py``: BENCHMARKS.md's figures drawn from its own tables."""
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plots  # noqa: E402

MD = """# B

## Generation (`x.py`)

| generator | batch | steps | images/s |
|---|---|---|---|
| AR | 1 | 32 | 200 |
| AR | 8 | 32 | 250 |
| MaskGIT | 1 | 8 | 75 |
| MaskGIT | 8 | 8 | 108 |
| MaskGIT | 1 | 64 | 11 |
| broken | row |

## Flow decoding

| tokenizer | batch | steps | unguided images/s | guided images/s |
|---|---|---|---|---|
| FlowMo | 1 | 1 | 500 | 400 |
| FlowMo | 1 | 25 | 50 | 40 |
"""


def test_tables_are_read_by_section_and_header():
    tables = plots.markdown_tables(MD)
    assert set(tables) == {"Generation", "Flow decoding"}
    gen = tables["Generation"]
    assert len(gen) == 5                                   # the malformed row is left out
    assert gen[3] == {"generator": "MaskGIT", "batch": "8", "steps": "8", "images/s": "108"}


def test_figures_draw_one_line_per_series(tmp_path):
    md = tmp_path / "B.md"
    md.write_text(MD)
    written = plots.write_figures(str(md), str(tmp_path))
    assert set(written) == {"generation", "decoding"}      # no Scale table: no scale figure
    path, labels = written["generation"]
    assert labels == ["AR, 32 steps", "MaskGIT, 64 steps", "MaskGIT, 8 steps"]
    assert plots.write_figures(str(md), str(tmp_path))["decoding"][1] == [
        "FlowMo batch 1, unguided", "FlowMo batch 1, guided"]
    image = np.asarray(Image.open(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 10


def test_the_project_benchmarks_file_has_all_three_figures(tmp_path):
    written = plots.write_figures(os.path.join(ROOT, "BENCHMARKS.md"), str(tmp_path))
    assert set(written) == {"generation", "decoding", "scale"}
    assert len(written["scale"][1]) == 17                  # every published config
