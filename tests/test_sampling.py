"""Flow samplers against diffusers' DPMSolverMultistepScheduler and a NumPy Euler loop."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sana_jax import sampling

# SANA's 20-step, shift-3 schedule: the timesteps of diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True,
# flow_shift=3.0) with 20 inference steps.
SANA_TIMESTEPS_20 = [999, 982, 963, 944, 922, 899, 874, 847, 817, 785,
                     749, 710, 666, 617, 562, 499, 428, 345, 249, 136]

_RNG = np.random.default_rng(0)
_W = _RNG.normal(size=(6, 6)).astype(np.float32) / 2
_NOISE = _RNG.normal(size=(3, 6)).astype(np.float32)


def _velocity_np(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A nonlinear, time-dependent velocity field (NumPy)."""
    return np.tanh(x @ _W) + 1e-3 * t[:, None] * x - 0.5


def _velocity_jnp(x, t):
    return jnp.tanh(x @ _W) + 1e-3 * t[:, None] * x - 0.5


def _scheduler(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
    )


def test_twenty_step_timesteps_match_spec():
    sigmas, timesteps = sampling.flow_sigmas(20, 3.0)
    assert timesteps.tolist() == SANA_TIMESTEPS_20
    assert sigmas.shape == (21,) and sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 20, 37])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_schedule_matches_diffusers(num_steps, shift):
    scheduler = _scheduler(shift)
    scheduler.set_timesteps(num_steps)
    sigmas, timesteps = sampling.flow_sigmas(num_steps, shift)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())


@pytest.mark.parametrize("num_steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_dpm_solver_matches_diffusers(num_steps, shift):
    scheduler = _scheduler(shift)
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(_NOISE)
    for t in scheduler.timesteps:
        t_batch = np.full((x.shape[0],), float(t), np.float32)
        v = torch.from_numpy(_velocity_np(x.numpy(), t_batch))
        x = scheduler.step(v, t, x).prev_sample
    ours = sampling.sample_flow(_velocity_jnp, jnp.asarray(_NOISE), num_steps=num_steps, shift=shift)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 4, 20])
def test_euler_matches_numpy_loop(num_steps):
    shift = 3.0
    t_raw = 1.0 - np.linspace(1.0, 1e-3, num_steps + 1)
    sigmas = np.flip(shift * t_raw / (1 + (shift - 1) * t_raw))[:-1]
    timesteps = np.floor(sigmas * 1000)
    sigmas = np.append(sigmas, 0.0)
    x = _NOISE.astype(np.float64)
    for i in range(num_steps):
        v = _velocity_np(x, np.full(x.shape[0], timesteps[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    ours = sampling.sample_flow(_velocity_jnp, jnp.asarray(_NOISE), num_steps=num_steps, shift=shift,
                                solver="euler")
    np.testing.assert_allclose(np.asarray(ours), x, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_combines_branches():
    seen = {}

    def doubled(x, t):
        seen["x"], seen["t"] = x, t
        return jnp.concatenate([jnp.full_like(x[:2], 1.0), x[2:] * 3.0])  # rows: [negative, positive]

    x = jnp.asarray(_NOISE[:2])
    t = jnp.asarray([500.0, 10.0])
    v = sampling.classifier_free_guidance(doubled, 4.5)(x, t)
    np.testing.assert_allclose(np.asarray(v), 1.0 + 4.5 * (3.0 * _NOISE[:2] - 1.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen["x"]), np.concatenate([_NOISE[:2]] * 2))
    np.testing.assert_array_equal(np.asarray(seen["t"]), [500.0, 10.0, 500.0, 10.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="heun"), "solver='heun'"),
        (dict(num_steps=0), "num_steps=0"),
        (dict(shift=0.0), "shift=0.0"),
        (dict(shift=-2.0), "shift=-2.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling.sample_flow(_velocity_jnp, jnp.asarray(_NOISE), **kwargs)
