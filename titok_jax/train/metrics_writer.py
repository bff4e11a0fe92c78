"""Process-0 logging: ``metrics.jsonl`` / ``eval.jsonl`` lines and TensorBoard scalars and images."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def _plain(v: Any) -> Any:
    v = np.asarray(v).item() if np.ndim(v) == 0 else v
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e30 if v > 0 else -1e30)
    return v


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None

    @property
    def tb(self):
        if self._tb is None and self.enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
        return self._tb

    def write(self, filename: str, step: int, values: Mapping[str, Any], prefix: str = "") -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if not self.enabled:
            return row
        with open(os.path.join(self.workdir, filename), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}{k}", v, int(step))
        return row

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
