"""The training objective against its formula written out in NumPy, as NVlabs trains SANA.

The reference (SANA 1.0 paper, section 3; NVlabs/Sana `train_scripts/train.py` and `diffusion/model/respace.py`):
  i = int64(1000 * sigmoid(n)), n ~ N(logit_mean, logit_std)          base sigma i / 1000
  sigma = s (i / 1000) / (1 + (s - 1) i / 1000) = s i / (1000 + (s - 1) i)   the shift
  model timestep = int64(1000 * sigma)
  x_t = (1 - sigma) x0 + sigma noise, target noise - x0, plain MSE.
For an integer shift s the timestep is exact integer arithmetic: (1000 s i) // (1000 + (s - 1) i).
(NVlabs tabulates the base sigmas as `1 - linspace(1, 0.001, 1000)` in float64, a hair below i / 1000 for some
i, so its int64 cast lands on t - 1 where the exact value is an integer; the exact formula is the convention.)
With `uniform_fraction` f, a row instead takes sigma = int(1000 u) / 1000, u ~ U[0, 1), unshifted, with
probability f: an extension of this project, not NVlabs'.

The library's samples are compared with the formula applied to the same standard normal / uniform draws
(`jax.random` on the keys `sample_sigmas` splits), and the mixture's distribution, whatever the key use, with
its exact CDF.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sana_jax.trainer import flow_matching
from sana_jax.trainer.flow_matching import flow_matching_loss, sample_sigmas


def _nvlabs_levels(n: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigma float64, model timestep int64, ambiguous rows) from logit draws n, in float64 / integers.

    A row is ambiguous when 1000 sigmoid(n) lies within 1e-3 of an integer: float32 and float64 may then
    truncate to different base indices.
    """
    scaled = 1000.0 / (1.0 + np.exp(-n.astype(np.float64)))
    i = np.floor(scaled).astype(np.int64)
    ambiguous = np.abs(scaled - np.round(scaled)) < 1e-3
    return shift * i / (1000 + (shift - 1) * i), (1000 * shift * i) // (1000 + (shift - 1) * i), ambiguous


@pytest.mark.parametrize("shift, mean, std", [(1, 0.0, 1.0), (3, 0.5, 1.5), (6, -0.3, 0.8)])
def test_logit_normal_levels_equal_the_formula_on_the_same_draws(shift, mean, std):
    key = jax.random.key(3)
    sigmas, timesteps = map(np.asarray, sample_sigmas(key, 4096, shift=float(shift), logit_mean=mean,
                                                      logit_std=std))
    n = mean + std * np.asarray(jax.random.normal(key, (4096,), jnp.float32), np.float64)
    expected_sigma, expected_t, ambiguous = _nvlabs_levels(n, shift)
    assert ambiguous.mean() < 0.01
    keep = ~ambiguous
    np.testing.assert_allclose(sigmas[keep], expected_sigma[keep], rtol=0, atol=1e-6)
    # The model timestep: an integer (held in float32) equal to int64(1000 sigma), exactly.
    np.testing.assert_array_equal(timesteps[keep], expected_t[keep])
    assert timesteps.dtype == np.float32 and np.all(timesteps == np.round(timesteps))
    assert 0 <= timesteps.min() and timesteps.max() <= 999


def test_uniform_fraction_mixture_on_the_same_draws():
    """Rows with choice draw < f take the uniform level, the others the shifted logit-normal one."""
    key, batch, shift, fraction = jax.random.key(5), 20000, 6, 0.25
    sigmas, timesteps = map(np.asarray, sample_sigmas(key, batch, shift=float(shift),
                                                      uniform_fraction=fraction))
    normal_key, uniform_key, choice_key = jax.random.split(key, 3)
    n = np.asarray(jax.random.normal(normal_key, (batch,), jnp.float32), np.float64)
    u = np.asarray(jax.random.uniform(uniform_key, (batch,), jnp.float32), np.float64)
    uniform_rows = np.asarray(jax.random.uniform(choice_key, (batch,))) < fraction
    logit_sigma, logit_t, ambiguous = _nvlabs_levels(n, shift)
    ambiguous |= np.abs(1000 * u - np.round(1000 * u)) < 1e-3
    expected_sigma = np.where(uniform_rows, np.floor(1000 * u) / 1000, logit_sigma)
    expected_t = np.where(uniform_rows, np.floor(1000 * u), logit_t)
    keep = ~ambiguous
    assert keep.mean() > 0.99 and abs(uniform_rows.mean() - fraction) < 0.01
    np.testing.assert_allclose(sigmas[keep], expected_sigma[keep], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(timesteps[keep], expected_t[keep])

    # The distribution, whatever the key plumbing: P(sigma <= x) = f P(int(1000 u) <= 1000 x)
    #   + (1 - f) P(i <= 1000 y) with y = x / (s - (s - 1) x) the unshifted level, and
    #   P(i <= k) = P(sigmoid(n) < (k + 1) / 1000). Kolmogorov-Smirnov distance on a grid, 0.99 level 0.0115.
    x = np.linspace(0.005, 0.995, 199)
    k = np.floor(1000 * x / (shift - (shift - 1) * x) + 1e-9)
    below = np.minimum((k + 1) / 1000, 1 - 1e-12)
    cdf = fraction * (np.floor(1000 * x + 1e-9) + 1) / 1000 + (1 - fraction) * stats.norm.cdf(
        np.log(below / (1 - below)))
    empirical = np.searchsorted(np.sort(sigmas), x + 1e-7, side="right") / batch
    assert np.max(np.abs(empirical - cdf)) < 1.63 / np.sqrt(batch)


def test_loss_noises_with_the_formula_and_targets_noise_minus_x0(monkeypatch):
    """A stub model records what the loss feeds it and returns fixed velocities v: the loss must be
    mean((v - (noise - x0))^2) at x_t = (1 - sigma) x0 + sigma noise and timestep int64(1000 sigma)."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    v = rng.standard_normal(x0.shape).astype(np.float32)
    batch = {"latents": jnp.asarray(x0), "text": jnp.ones((4, 5, 2)), "text_mask": jnp.ones((4, 5), jnp.int32)}
    seen = {}

    def stub(params, config, x_t, timesteps, text, text_mask):
        seen.update(x_t=np.asarray(x_t), timesteps=np.asarray(timesteps))
        return jnp.asarray(v)

    monkeypatch.setattr(flow_matching, "forward", stub)
    key = jax.random.key(11)
    loss = float(flow_matching_loss({}, None, batch, key, shift=3.0, logit_mean=0.2, logit_std=1.3))

    sigma_key, noise_key = jax.random.split(key)
    n = 0.2 + 1.3 * np.asarray(jax.random.normal(sigma_key, (4,), jnp.float32), np.float64)
    sigma, timestep, ambiguous = _nvlabs_levels(n, 3)
    assert not ambiguous.any()
    noise = np.asarray(jax.random.normal(noise_key, x0.shape, jnp.float32), np.float64)
    s = sigma[:, None, None, None]
    np.testing.assert_array_equal(seen["timesteps"], timestep)
    np.testing.assert_allclose(seen["x_t"], (1 - s) * x0 + s * noise, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss, np.mean((v - (noise - x0)) ** 2), rtol=1e-5)
