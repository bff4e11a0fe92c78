"""Rectified flow (t = 1 noise, t = 0 data): interpolation and velocity target, training time
samplers, sampling time grids, Euler/Heun ODE samplers as one ``lax.scan``, CFG/APG guidance with
an interval, the training loss, and the published FlexTok / FlowMo recipes. Pure functions."""
from titok_jax.flow.grids import GRIDS, check_grid, time_grid, time_grid_np  # noqa: F401
from titok_jax.flow.guidance import (GUIDANCE_PRESETS, GuidanceConfig, apg, cfg,  # noqa: F401
                                     guidance_preset, guide, with_scale)
from titok_jax.flow.interpolation import (broadcast_time, edm_sigma_to_t, interpolate,  # noqa: F401
                                          noise_from_velocity, velocity_target, x0_from_velocity)
from titok_jax.flow.losses import FlowLossAux, rectified_flow_loss  # noqa: F401
from titok_jax.flow.presets import FLOW_PRESETS, FlowRecipe, flow_preset  # noqa: F401
from titok_jax.flow.samplers import METHODS, initial_noise, match_batch, sample, start_noise  # noqa: F401
from titok_jax.flow.time_samplers import (TIME_SAMPLER_PRESETS, TIME_SAMPLERS, sample_time,  # noqa: F401
                                          shift_time, time_sampler_preset)
