"""Flow-matching samplers: Flow-DPM-Solver (DPM-Solver++ 2M) and Euler, with classifier-free guidance.

The model predicts the velocity `v = noise - x0` of `x_t = (1 - sigma) x0 + sigma noise`, so
`x0 = x_t - sigma v`. The schedule and the solver match diffusers'
`DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)`
with its defaults (order 2, midpoint form, first order on the first and on the last step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax import model as sana_model
from sana_jax.model.config import SanaConfig

# "flow_match_euler": Euler steps on diffusers' FlowMatchEulerDiscreteScheduler schedule
# (`flow_match_euler_schedule`); the other two run on `flow_sigmas`.
SOLVERS = ("flow_dpm_solver", "euler", "flow_match_euler")
NUM_TRAIN_TIMESTEPS = 1000

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_schedule(num_steps: int, shift: float, solver: str = SOLVERS[0]) -> None:
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected an integer >= 1")
    if not shift > 0:
        raise ValueError(f"shift={shift!r}: expected a number > 0")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")


def shift_sigmas(sigmas, shift: float):
    """sigma -> s * sigma / (1 + (s - 1) * sigma): more time at high noise for s > 1 (NumPy or JAX arrays)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """The shifted flow schedule.

    Returns:
      sigmas: (num_steps + 1,) float32, decreasing from shift(0.999) to exactly 0.
      timesteps: (num_steps,) int64 model timesteps, sigma * 1000 truncated toward zero.
    """
    _check_schedule(num_steps, shift)
    base = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
    sigmas = np.flip(shift_sigmas(base, shift))[:-1]
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return np.append(sigmas, 0.0).astype(np.float32), timesteps


def flow_match_euler_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (num_steps + 1,), timesteps (num_steps,)) float32 of diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`.

    The scheduler shifts its training sigmas i/1000 once to get sigma_max and sigma_min, spaces num_steps
    sigmas linearly between them and shifts those again; timesteps are sigma * 1000, not rounded.
    """
    _check_schedule(num_steps, shift)
    n = NUM_TRAIN_TIMESTEPS
    train = np.float32(1.0) / np.float32(n)  # The smallest training sigma, before the shift.
    shift32 = np.float32(shift)
    sigma_min = float(shift32 * train / (np.float32(1.0) + (shift32 - np.float32(1.0)) * train))
    base = np.linspace(1.0 * n, sigma_min * n, num_steps) / n  # sigma_max = shift(1) = 1.
    sigmas = shift_sigmas(base, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0.0)), sigmas * np.float32(n)


def solver_schedule(num_steps: int, shift: float, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """The (sigmas, timesteps) that `solver` runs on by default: `flow_match_euler_schedule` for
    "flow_match_euler", `flow_sigmas` for the others."""
    _check_schedule(num_steps, shift, solver)
    make_schedule = flow_match_euler_schedule if solver == "flow_match_euler" else flow_sigmas
    return make_schedule(num_steps, shift)


def _update_coefficients(sigmas: np.ndarray, solver: str) -> np.ndarray:
    """Per-step (a, b, c), shape (3, num_steps), of `x_next = a x + b x0 + c x0_prev`.

    x0 is this step's data prediction and x0_prev the previous step's. With alpha = 1 - sigma and
    lambda = log(alpha / sigma), h = lambda_next - lambda and k = alpha_next (1 - exp(-h)):
    first order (DPM-Solver++ 1, which in this parameterisation is exactly the Euler step
    `x + (sigma_next - sigma) v`) is a = sigma_next / sigma, b = k, c = 0; the second-order midpoint
    update adds `k / (2 r) (x0 - x0_prev)` with r = h_prev / h.
    """
    s = sigmas.astype(np.float64)
    num_steps = len(s) - 1
    alpha = 1.0 - s
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)  # +inf at the final sigma 0
    h = lam[1:] - lam[:-1]
    a = s[1:] / s[:-1]
    b = alpha[1:] * -np.expm1(-h)
    c = np.zeros(num_steps)
    if solver == "flow_dpm_solver" and num_steps > 2:
        # Second order on every step but the first and the last.
        i = np.arange(1, num_steps - 1)
        half_over_r = 0.5 * h[i] / h[i - 1]
        c[i] = -b[i] * half_over_r
        b[i] = b[i] * (1.0 + half_over_r)
    return np.stack([a, b, c]).astype(np.float32)


def sample_flow(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    *,
    num_steps: int = 20,
    shift: float = 3.0,
    solver: str = "flow_dpm_solver",
    schedule: tuple[np.ndarray, np.ndarray] | None = None,
    return_path: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Integrates the flow from `noise` (sigma = 1) to a sample (sigma = 0).

    Args:
      velocity_fn: `(x, timesteps) -> v`, x of noise's shape (B, ...), timesteps (B,) float32 holding the
        model timesteps of the schedule.
      noise: (B, ...) starting point.
      num_steps, shift: the schedule of `flow_sigmas` (of `flow_match_euler_schedule` for that solver); static.
      solver: "flow_dpm_solver" (DPM-Solver++ 2M), "euler" or "flow_match_euler" (`SOLVERS`).
      schedule: another schedule instead, (sigmas (num_steps + 1,) decreasing to 0, timesteps (num_steps,)),
        e.g. diffusers' FlowMatchEulerDiscreteScheduler's; host arrays.
      return_path: also return the sampling path.

    Returns:
      The final x0 sample, float32, noise's shape; with `return_path`, also the (num_steps, B, ...) inputs x_t
      of the steps, the points where the model is evaluated (at the schedule's timesteps).
    """
    _check_schedule(num_steps, shift, solver)
    if schedule is None:
        schedule = solver_schedule(num_steps, shift, solver)
    sigmas, timesteps = schedule
    if len(sigmas) != num_steps + 1 or len(timesteps) != num_steps or sigmas[-1] != 0:
        raise ValueError(f"schedule of {len(sigmas)} sigmas (last {sigmas[-1]}) and {len(timesteps)} timesteps: "
                         f"expected {num_steps + 1} sigmas ending at 0 and {num_steps} timesteps")
    a, b, c = _update_coefficients(sigmas, solver)
    per_step = (sigmas[:-1], timesteps.astype(np.float32), a, b, c)
    batch = noise.shape[0]

    def step(carry, xs):
        x, x0_prev = carry
        sigma, t, a, b, c = xs
        v = velocity_fn(x, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)
        x0 = x - sigma * v
        return (a * x + b * x0 + c * x0_prev, x0), x if return_path else None

    x = jnp.asarray(noise, jnp.float32)
    (x, _), path = jax.lax.scan(step, (x, jnp.zeros_like(x)), per_step)
    return (x, path) if return_path else x


def classifier_free_guidance(velocity_fn: VelocityFn, guidance_scale: float) -> VelocityFn:
    """Wraps a velocity function evaluated on the doubled batch [negative, positive].

    `velocity_fn(x2, t2)` sees x2 = concat([x, x]) and t2 = concat([t, t]) (2B rows); the wrapped
    function returns `v_u + guidance_scale * (v_c - v_u)` in float32 for the B rows of x.
    """

    def guided(x: jax.Array, timesteps: jax.Array) -> jax.Array:
        v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([timesteps, timesteps]))
        v_uncond, v_cond = jnp.split(v.astype(jnp.float32), 2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return guided


def sample_from_noise(
    params,
    config: SanaConfig,
    noise: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    null_text: jax.Array,
    null_mask: jax.Array,
    *,
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    shift: float = 3.0,
    solver: str = "flow_dpm_solver",
    return_path: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples latents from given noise with classifier-free guidance (pure; jit- and vmap-able).

    Args:
      params, config: the model.
      noise: (B, h, w, config.in_channels) starting noise.
      text: (B, L, C_text) caption features; text_mask: (B, L) of 0/1.
      null_text, null_mask: the negative caption, broadcastable to text's and text_mask's shapes.
      num_steps, shift, solver, return_path: see `sample_flow`; guidance_scale 1 runs the positive branch
        alone. All static.

    Returns:
      (B, h, w, config.in_channels) float32 latents; with `return_path`, also the (num_steps, B, h, w, C) path.
    """
    if guidance_scale == 1.0:
        velocity = lambda x, t: sana_model.forward(params, config, x, t, text, text_mask)
    else:
        both_text = jnp.concatenate([jnp.broadcast_to(null_text, text.shape).astype(text.dtype), text])
        both_mask = jnp.concatenate([jnp.broadcast_to(null_mask, text_mask.shape).astype(text_mask.dtype),
                                     text_mask])
        velocity = classifier_free_guidance(
            lambda x, t: sana_model.forward(params, config, x, t, both_text, both_mask), guidance_scale)
    return sample_flow(velocity, noise, num_steps=num_steps, shift=shift, solver=solver, return_path=return_path)


@functools.partial(
    jax.jit,
    static_argnames=("config", "height", "width", "num_steps", "guidance_scale", "shift", "solver"),
)
def generate(
    params,
    config: SanaConfig,
    text: jax.Array,
    text_mask: jax.Array,
    null_text: jax.Array,
    null_mask: jax.Array,
    key: jax.Array,
    *,
    height: int,
    width: int,
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    shift: float = 3.0,
    solver: str = "flow_dpm_solver",
) -> jax.Array:
    """Samples latents for a batch of captions with classifier-free guidance.

    Args:
      params, config: the model.
      text: (B, L, C_text) caption features; text_mask: (B, L) of 0/1.
      null_text: the negative (empty) caption, (L, C_text) or broadcastable to text's shape;
        null_mask: (L,) or broadcastable to (B, L).
      key: PRNG key of the starting noise.
      height, width: latent size in latent pixels (multiples of config.patch_size).
      num_steps, shift, solver: see `sample_flow`. guidance_scale 1 runs the positive branch alone.

    Returns:
      (B, height, width, config.in_channels) float32 latents.
    """
    _check_schedule(num_steps, shift, solver)
    p = config.patch_size
    if height % p or width % p or height < 1 or width < 1:
        raise ValueError(f"latent size {height}x{width}: expected positive multiples of patch_size={p}")
    if text.ndim != 3 or text.shape[-1] != config.caption_channels or text_mask.shape != text.shape[:2]:
        raise ValueError(f"text {text.shape} / text_mask {text_mask.shape}: "
                         f"expected (B, L, {config.caption_channels}) / (B, L)")
    noise = jax.random.normal(key, (text.shape[0], height, width, config.in_channels), jnp.float32)
    return sample_from_noise(params, config, noise, text, text_mask, null_text, null_mask, num_steps=num_steps,
                             guidance_scale=guidance_scale, shift=shift, solver=solver)
