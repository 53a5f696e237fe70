"""The 3x3 depthwise convolution, alone and gated as in the Mix-FFN, against a NumPy float64 re-derivation: every
implementation's values and gradients, the native CPU kernels under vmap and on a sharded mesh, their build and the
fallback without one."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.kernels import depthwise_conv, native
from sana_jax.kernels.depthwise_conv import depthwise_conv3x3, gated_depthwise_conv3x3, native_unsupported

# 300 channels: two full blocks of the native kernels' 128 and a partial one; a single row; a single pixel.
SHAPES = [(2, 5, 7, 300), (3, 1, 4, 8), (1, 1, 1, 5)]


def _inputs(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (shape, (3, 3, channels), (channels,), shape))


def _reference(x, kernel, bias, dy):
    """(y, dx, dkernel, dbias) in float64: y = bias + sum over taps of shifted x * kernel, and its VJP with dy."""
    x, kernel, bias, dy = (np.asarray(a, np.float64) for a in (x, kernel, bias, dy))
    _, height, width, _ = x.shape
    pad = lambda a: np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xp, dyp = pad(x), pad(dy)
    taps = [(i, j) for i in range(3) for j in range(3)]
    y = bias + sum(xp[:, i:i + height, j:j + width] * kernel[i, j] for i, j in taps)
    # out[s] depends on x[s + i - 1], so dx[s] = sum over taps of dy[s - i + 1] kernel[i].
    dx = sum(dyp[:, 2 - i:2 - i + height, 2 - j:2 - j + width] * kernel[i, j] for i, j in taps)
    dkernel = np.stack([(xp[:, i:i + height, j:j + width] * dy).sum((0, 1, 2)) for i, j in taps])
    return y, dx, dkernel.reshape(kernel.shape), dy.sum((0, 1, 2))


def _gated_inputs(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """u (B, H, W, 2C) over SiLU's curved range, shift, kernel, bias and the output gradient (B, H, W, C)."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    shapes = (shape, (channels,), (3, 3, channels), (channels,), (*shape[:-1], channels // 2))
    u, *rest = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    return (3 * u, *rest)


def _gated_reference(u, shift, kernel, bias, dout):
    """(out, du, dshift, dkernel, dbias) in float64: out = a * silu(g), (a, g) the channel halves of
    y = conv(silu(u + shift)), and its VJP with dout by the chain rule through `_reference`."""
    u, shift, dout = (np.asarray(a, np.float64) for a in (u, shift, dout))
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    silu_derivative = lambda z: sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    z = u + shift
    s = z * sigmoid(z)
    y = _reference(s, kernel, bias, np.zeros_like(s))[0]
    a, g = np.split(y, 2, axis=-1)
    dy = np.concatenate([dout * g * sigmoid(g), dout * a * silu_derivative(g)], axis=-1)
    _, ds, dkernel, dbias = _reference(s, kernel, bias, dy)
    dz = ds * silu_derivative(z)
    return a * g * sigmoid(g), dz, dz.sum((0, 1, 2)), dkernel, dbias


def _value_and_vjp(impl, x, kernel, bias, dy):
    y, vjp = jax.vjp(lambda *a: depthwise_conv3x3(*a, impl=impl), x, kernel, bias)
    return (y, *vjp(dy))


def _gated_value_and_vjp(impl, u, shift, kernel, bias, dout):
    out, vjp = jax.vjp(lambda *a: gated_depthwise_conv3x3(*a, impl=impl), u, shift, kernel, bias)
    return (out, *vjp(dout))


def _assert_matches(actual, expected):
    names = ("y", "dx", "dkernel", "dbias") if len(expected) == 4 else ("out", "du", "dshift", "dkernel", "dbias")
    for name, a, e in zip(names, actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, atol=2e-5 * max(1.0, np.abs(e).max()), err_msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["native", "shifted", "grouped", "auto"])
def test_values_and_gradients_match_float64_reference(impl, shape):
    inputs = _inputs(sum(shape), shape)
    _assert_matches(jax.jit(_value_and_vjp, static_argnums=0)(impl, *inputs), _reference(*inputs))


# 2C = 600: C = 300 per half, two full blocks of 128 and a partial one.
@pytest.mark.parametrize("shape", [(2, 5, 7, 600), (3, 1, 4, 16), (1, 1, 1, 6)], ids=str)
@pytest.mark.parametrize("impl", ["native", "shifted", "grouped", "auto"])
def test_gated_values_and_gradients_match_float64_reference(impl, shape):
    inputs = _gated_inputs(sum(shape), shape)
    _assert_matches(jax.jit(_gated_value_and_vjp, static_argnums=0)(impl, *inputs), _gated_reference(*inputs))


def test_auto_runs_the_native_kernels_on_cpu():
    x = jnp.zeros((1, 4, 4, 8))
    assert native_unsupported(x) is None
    hlo = jax.jit(lambda *a: _value_and_vjp("auto", *a)).lower(x, jnp.zeros((3, 3, 8)), jnp.zeros(8), x).as_text()
    assert depthwise_conv._FORWARD_TARGET in hlo and depthwise_conv._BACKWARD_TARGET in hlo
    assert native_unsupported(x.astype(jnp.bfloat16)) == "dtype bfloat16 is not float32"
    hlo = jax.jit(lambda *a: _gated_value_and_vjp("auto", *a)).lower(*_gated_inputs(0, (1, 4, 4, 8))).as_text()
    assert depthwise_conv._GATED_FORWARD_TARGET in hlo and depthwise_conv._GATED_BACKWARD_TARGET in hlo


def test_native_under_vmap_with_mapped_and_unmapped_weights():
    x, kernel, bias, dy = (np.stack(a) for a in zip(*(_inputs(10 + i, (2, 3, 5, 130)) for i in range(3)),
                                                     strict=True))
    mapped = jax.jit(jax.vmap(lambda *a: _value_and_vjp("native", *a)))(x, kernel, bias, dy)
    shared = jax.jit(jax.vmap(lambda x, dy: _value_and_vjp("native", x, kernel[0], bias[0], dy)))(x, dy)
    for i in range(3):
        _assert_matches([a[i] for a in mapped], _reference(x[i], kernel[i], bias[i], dy[i]))
        y, dx, dkernel, dbias = _reference(x[i], kernel[0], bias[0], dy[i])
        _assert_matches([a[i] for a in shared], (y, dx, dkernel, dbias))


def test_gated_native_under_vmap():
    inputs = [np.stack(a) for a in zip(*(_gated_inputs(20 + i, (2, 3, 5, 260)) for i in range(3)), strict=True)]
    mapped = jax.jit(jax.vmap(lambda *a: _gated_value_and_vjp("native", *a)))(*inputs)
    for i in range(3):
        _assert_matches([a[i] for a in mapped], _gated_reference(*(a[i] for a in inputs)))


def test_bad_inputs_name_the_problem():
    x, kernel, bias, _ = (jnp.asarray(a) for a in _inputs(0, (1, 3, 3, 4)))
    with pytest.raises(ValueError, match=r"impl='fast'.*expected one of"):
        depthwise_conv3x3(x, kernel, bias, impl="fast")
    with pytest.raises(ValueError, match=r"kernel \(3, 3, C\).*\(3, 3, 5\)"):
        depthwise_conv3x3(x, jnp.zeros((3, 3, 5)), bias)
    with pytest.raises(ValueError, match="one dtype.*bfloat16"):
        depthwise_conv3x3(x, kernel.astype(jnp.bfloat16), bias)
    with pytest.raises(ValueError, match="impl='native'.*bfloat16 is not float32"):
        depthwise_conv3x3(*(a.astype(jnp.bfloat16) for a in (x, kernel, bias)), impl="native")
    u, shift, kernel, bias, _ = (jnp.asarray(a) for a in _gated_inputs(0, (1, 3, 3, 6)))
    with pytest.raises(ValueError, match=r"gated_depthwise_conv3x3: expected an even number.*u \(1, 3, 3, 5\)"):
        gated_depthwise_conv3x3(u[..., :5], shift[:5], kernel[..., :5], bias[:5])
    with pytest.raises(ValueError, match=r"shift \(2C,\).*shift \(4,\)"):
        gated_depthwise_conv3x3(u, shift[:4], kernel, bias)


def test_without_a_build_auto_falls_back_and_says_why(monkeypatch, caplog):
    reason = "no C++ compiler found (a test's stand-in)"
    monkeypatch.setattr(depthwise_conv, "_native_build_failure", lambda: reason)
    inputs = _inputs(5, (2, 4, 3, 6))
    with pytest.raises(ValueError, match=r"impl='native'.*a test's stand-in"):
        depthwise_conv3x3(*(jnp.asarray(a) for a in inputs[:3]), impl="native")
    with caplog.at_level(logging.WARNING, logger=depthwise_conv.__name__):
        hlo = jax.jit(lambda *a: _value_and_vjp("auto", *a)).lower(*inputs).as_text()
        _assert_matches(_value_and_vjp("auto", *inputs), _reference(*inputs))
    assert depthwise_conv._FORWARD_TARGET not in hlo
    assert any(reason in r.getMessage() and "shifted" in r.getMessage() for r in caplog.records)


def test_library_is_built_once_per_cache_and_build_failures_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    native.library.__wrapped__("depthwise_conv")
    built = sorted((tmp_path / "sana_jax" / "native").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert hasattr(native.library.__wrapped__("depthwise_conv"), "SanaDepthwiseConv3x3Backward")
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt

    monkeypatch.setenv("CXX", "sana-jax-no-such-compiler")
    with pytest.raises(native.NativeBuildError, match="no C.. compiler found .tried sana-jax-no-such-compiler"):
        native.library.__wrapped__("depthwise_conv")
    monkeypatch.setenv("CXX", "false")  # runs, and fails
    with pytest.raises(native.NativeBuildError, match=r"^false failed on .*depthwise_conv\.cc") as failure:
        native.library.__wrapped__("depthwise_conv")
    assert "\n" not in str(failure.value)


# ----------------------------------------------------------------------------- sharded, in a child process

# name: (mesh shape, axis names, axis type, x's PartitionSpec)
MESHES = {"batch": ((2,), ("data",), "Auto", ("data",)),
          "channels": ((2,), ("model",), "Auto", (None, None, None, "model")),
          "batch-explicit": ((2,), ("data",), "Explicit", ("data",))}


def test_sharded_batch_or_channels_stay_sharded(tmp_path):
    """The native kernels run on each device's shard, without gathering, on Auto and Explicit mesh axes (the gated
    ones on a batch-sharded mesh), and under a vmap whose mapped axis is sharded over an Explicit one (as the
    sharded candidates sampler runs)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    with np.load(tmp_path / "arrays.npz") as arrays:
        expected = _reference(*(arrays[n] for n in ("x", "kernel", "bias", "dy")))
        for name in MESHES:
            _assert_matches([arrays[f"{name}/{n}"] for n in ("y", "dx", "dkernel", "dbias")], expected)
            assert report[name] == {"all_gather": False, "native": True}
        x, dy = arrays["x"].reshape(2, 2, *arrays["x"].shape[1:]), arrays["dy"].reshape(2, 2, *arrays["dy"].shape[1:])
        for i in range(2):
            expected = _reference(x[i], arrays["kernel"], arrays["bias"], dy[i])
            _assert_matches([arrays[f"vmap-explicit/{n}"][i] for n in ("y", "dx", "dkernel", "dbias")], expected)
        # Only the per-image kernel and bias gradients, (4, 3, 3, C) and (4, C), are gathered, to sum per candidate.
        assert report["vmap-explicit"]["native"]
        assert sorted(report["vmap-explicit"]["gathered"]) == [[4, 3, 3, 256], [4, 256]]
        gated = [arrays[f"gated/{n}"] for n in ("u", "shift", "kernel", "bias", "dout")]
        for name in ("batch", "batch-explicit"):
            _assert_matches([arrays[f"gated-{name}/{n}"] for n in ("out", "du", "dshift", "dkernel", "dbias")],
                            _gated_reference(*gated))
            assert report[f"gated-{name}"] == {"all_gather": False, "native": True}


def _run_child(out_dir: str) -> None:
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    x, kernel, bias, dy = _inputs(7, (4, 6, 5, 256))
    arrays = {"x": x, "kernel": kernel, "bias": bias, "dy": dy}
    report = {}
    for name, (shape, axes, axis_type, spec) in MESHES.items():
        mesh = jax.make_mesh(shape, axes, axis_types=(getattr(AxisType, axis_type),) * len(shape))
        placed = [jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec))) for a in (x, dy)]
        compiled = jax.jit(lambda x, dy: _value_and_vjp("auto", x, kernel, bias, dy)).lower(*placed).compile()
        for key, value in zip(("y", "dx", "dkernel", "dbias"), compiled(*placed), strict=True):
            arrays[f"{name}/{key}"] = np.asarray(value)
        hlo = compiled.as_text()
        report[name] = {"all_gather": "all-gather" in hlo, "native": depthwise_conv._BACKWARD_TARGET in hlo}
    u, shift, gated_kernel, gated_bias, dout = gated = _gated_inputs(8, (4, 6, 5, 256))
    arrays.update({f"gated/{n}": a for n, a in zip(("u", "shift", "kernel", "bias", "dout"), gated, strict=True)})
    for name in ("batch", "batch-explicit"):
        shape, axes, axis_type, spec = MESHES[name]
        mesh = jax.make_mesh(shape, axes, axis_types=(getattr(AxisType, axis_type),) * len(shape))
        placed = [jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec))) for a in (u, dout)]
        compiled = jax.jit(lambda u, dout: _gated_value_and_vjp("auto", u, shift, gated_kernel, gated_bias, dout)
                           ).lower(*placed).compile()
        for key, value in zip(("out", "du", "dshift", "dkernel", "dbias"), compiled(*placed), strict=True):
            arrays[f"gated-{name}/{key}"] = np.asarray(value)
        hlo = compiled.as_text()
        report[f"gated-{name}"] = {"all_gather": "all-gather" in hlo,
                                   "native": depthwise_conv._GATED_BACKWARD_TARGET in hlo}
    # Two candidates of two images each, the candidates' axis sharded over an Explicit mesh axis.
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
    placed = [jax.device_put(a.reshape(2, 2, *a.shape[1:]), NamedSharding(mesh, PartitionSpec("data")))
              for a in (x, dy)]
    per_candidate = jax.vmap(lambda x, dy: _value_and_vjp("auto", x, kernel, bias, dy))
    compiled = jax.jit(per_candidate).lower(*placed).compile()
    for key, value in zip(("y", "dx", "dkernel", "dbias"), compiled(*placed), strict=True):
        arrays[f"vmap-explicit/{key}"] = np.asarray(value)
    hlo = compiled.as_text()
    gathered = re.findall(r"= f32\[([\d,]+)\][^ ]* all-gather\(", hlo)
    report["vmap-explicit"] = {"gathered": [list(map(int, shape.split(","))) for shape in gathered],
                               "native": depthwise_conv._BACKWARD_TARGET in hlo}
    np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _run_child(sys.argv[1])
