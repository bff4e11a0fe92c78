"""Published rectified-flow recipes (training time sampler, sampling grid, solver, guidance).

=========  =========================  =====================  ======  ======  ========================
preset     training t                 grid                   steps   solver  guidance
=========  =========================  =====================  ======  ======  ========================
flextok    logit-normal(0, 1)         uniform                25 [1]  Euler   APG w=7.5, beta=-0.5,
                                                                             r=2.5, eta=0, every step
flowmo     0.9 logit-normal(0, 1)     power rho=4            25      Euler   CFG w=1.5 on t in
           + 0.1 U(0, 1)              ((j/n)^4, "pow_0.25")                  [0.1453, 0.5050]
=========  =========================  =====================  ======  ======  ========================

[1] FlexTok's pipeline default is 25 steps; its README decodes with 20.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from titok_jax.flow.grids import time_grid
from titok_jax.flow.guidance import GUIDANCE_PRESETS, GuidanceConfig
from titok_jax.flow.time_samplers import TIME_SAMPLER_PRESETS


@dataclasses.dataclass(frozen=True)
class FlowRecipe:
    """A training time sampler plus a sampling recipe; ``grid()`` builds the time grid."""

    time_sampler: dict[str, Any]
    grid_kind: str
    grid_params: dict[str, Any]
    steps: int
    method: str
    guidance: GuidanceConfig | None

    def grid(self, steps: int | None = None) -> jax.Array:
        """The recipe's time grid with ``steps`` (default: the published count) steps."""
        return time_grid(self.steps if steps is None else steps, self.grid_kind, **self.grid_params)


FLOW_PRESETS: dict[str, FlowRecipe] = {
    "flextok": FlowRecipe(TIME_SAMPLER_PRESETS["flextok"], "uniform", {}, 25, "euler",
                          GUIDANCE_PRESETS["flextok"]),
    "flowmo": FlowRecipe(TIME_SAMPLER_PRESETS["flowmo"], "power", {"rho": 4.0}, 25, "euler",
                         GUIDANCE_PRESETS["flowmo"]),
}


def flow_preset(name: str) -> FlowRecipe:
    """The published recipe ``name`` (``"flextok"`` or ``"flowmo"``)."""
    if name not in FLOW_PRESETS:
        raise ValueError(f"unknown flow preset {name!r}; known: {sorted(FLOW_PRESETS)}")
    return FLOW_PRESETS[name]
