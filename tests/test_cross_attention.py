"""The cross-attention (`sana_jax.kernels.cross_attention`): the C++ kernels and the jnp form against the attention
in torch float64 with its autograd gradients; under vmap; and sharded over two host devices in a child process."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sana_jax.kernels import cross_attention, cross_attention_xla

native_attention = importlib.import_module("sana_jax.kernels.native_attention")

MASK_BIAS = -10000.0  # the model's bias on masked caption tokens
TOLERANCE = 1e-5  # normwise relative error against float64

# (B, N, L, H, d): L off and on multiples of 16, one key, one query, every head-dim class the kernels take.
SHAPES = [(2, 37, 5, 3, 16), (2, 64, 32, 2, 32), (1, 20, 300, 2, 64), (1, 1, 1, 1, 128), (2, 9, 17, 2, 48)]


def _inputs(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """q, k, v, bias, dout (float32): about a third of the keys masked (never the first), the rest biased a little."""
    batch, tokens, keys, heads, d = shape
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((batch, tokens, heads, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((batch, keys, heads, d)).astype(np.float32) for _ in range(2))
    masked = rng.random((batch, keys)) < 0.35
    masked[:, 0] = False
    bias = (np.where(masked, MASK_BIAS, 0.0) + 0.5 * rng.standard_normal((batch, keys))).astype(np.float32)
    return q, k, v, bias, dout


def _reference(q, k, v, bias, dout):
    """out, dq, dk, dv, dbias of the attention in torch float64 (autograd)."""
    q, k, v, bias = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (q, k, v, bias))
    logits = torch.einsum("bnhd,blhd->bhnl", q, k) / np.sqrt(q.shape[-1]) + bias[:, None, None, :]
    out = torch.einsum("bhnl,blhd->bnhd", torch.softmax(logits, dim=-1), v)
    out.backward(torch.tensor(np.asarray(dout, np.float64)))
    return out.detach().numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy(), bias.grad.numpy()


def _value_and_grads(impl):
    def run(q, k, v, bias, dout):
        out, vjp = jax.vjp(lambda *a: cross_attention(*a, impl=impl), q, k, v, bias)
        return (out, *vjp(dout))

    return run


def _assert_matches(actual, expected):
    for name, a, e in zip(("out", "dq", "dk", "dv", "dbias"), actual, expected, strict=True):
        a = np.asarray(a, np.float64)
        assert a.shape == e.shape and np.all(np.isfinite(a)), name
        error = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
        assert error < TOLERANCE, (name, error)


@pytest.mark.parametrize("impl", ["native", "xla"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_match_float64_reference(impl, shape):
    inputs = _inputs(0, shape)
    _assert_matches(jax.jit(_value_and_grads(impl))(*inputs), _reference(*inputs))


def test_auto_runs_the_native_kernels_on_cpu_and_xla_where_they_cannot():
    q, k, v, bias, dout = _inputs(1, (1, 4, 3, 2, 16))
    hlo = jax.jit(_value_and_grads("auto")).lower(q, k, v, bias, dout).as_text()
    assert native_attention.CROSS_FORWARD in hlo and native_attention.CROSS_BACKWARD in hlo
    narrow = [a[..., :8] for a in (q, k, v)]  # head dim 8
    hlo = jax.jit(lambda *a: cross_attention(*a, impl="auto")).lower(*narrow, bias).as_text()
    assert native_attention.CROSS_FORWARD not in hlo
    np.testing.assert_allclose(cross_attention(*narrow, bias), cross_attention_xla(*narrow, bias), rtol=1e-5,
                               atol=1e-6)
    half = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    assert cross_attention(*half, bias).dtype == jnp.bfloat16


def test_native_under_vmap_with_shared_keys():
    q, k, v, bias, dout = _inputs(2, (2, 11, 6, 2, 32))
    qs, douts = np.stack([q, -q]), np.stack([dout, dout[::-1]])
    outs = jax.jit(jax.vmap(lambda q, g: _value_and_grads("native")(q, k, v, bias, g)))(qs, douts)
    for i in range(2):
        _assert_matches([a[i] for a in outs], _reference(qs[i], k, v, bias, douts[i]))


def test_bad_inputs_name_the_problem():
    q, k, v, bias, _ = (jnp.asarray(a) for a in _inputs(3, (1, 4, 3, 2, 16)))
    with pytest.raises(ValueError, match="impl='cuda'"):
        cross_attention(q, k, v, bias, impl="cuda")
    with pytest.raises(ValueError, match=r"got \(1, 4, 2, 16\), \(1, 3, 2, 16\), \(1, 2, 2, 16\)"):
        cross_attention(q, k, v[:, 1:], bias)
    with pytest.raises(ValueError, match=r"bias \(B, L\), got .*\(1, 4\)"):
        cross_attention(q, k, v, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="one dtype"):
        cross_attention(q, k.astype(jnp.bfloat16), v, bias)
    with pytest.raises(ValueError, match="impl='native'.*head dim 8 is not a multiple of 16"):
        cross_attention(q[..., :8], k[..., :8], v[..., :8], bias, impl="native")
    with pytest.raises(ValueError, match="impl='native'.*dtype bfloat16 is not float32"):
        cross_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), bias, impl="native")


# ----------------------------------------------------------------------------- sharded, in a child process

# name: (mesh shape, axis names, axis type, q's PartitionSpec (k and v alike, bias by its batch axis))
MESHES = {"batch": ((2,), ("data",), "Auto", ("data",)),
          "heads": ((2,), ("model",), "Auto", (None, None, "model")),
          "batch-explicit": ((2,), ("data",), "Explicit", ("data",))}


def test_sharded_batch_or_heads_stay_sharded(tmp_path):
    """The kernels run on each device's shard, without gathering, on Auto and Explicit mesh axes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    expected = _reference(*_inputs(4, (4, 12, 7, 2, 32)))
    with np.load(tmp_path / "arrays.npz") as arrays:
        for name in MESHES:
            _assert_matches([arrays[f"{name}/{n}"] for n in ("out", "dq", "dk", "dv", "dbias")], expected)
            assert report[name] == {"all_gather": False, "native": True}


def _run_child(out_dir: str) -> None:
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    q, k, v, bias, dout = _inputs(4, (4, 12, 7, 2, 32))
    arrays, report = {}, {}
    for name, (shape, axes, axis_type, spec) in MESHES.items():
        mesh = jax.make_mesh(shape, axes, axis_types=(getattr(AxisType, axis_type),) * len(shape))
        tokens = NamedSharding(mesh, PartitionSpec(*spec))
        placed = [jax.device_put(a, tokens) for a in (q, k, v)]
        placed.append(jax.device_put(bias, NamedSharding(mesh, PartitionSpec(spec[0]))))
        placed.append(jax.device_put(dout, tokens))
        compiled = jax.jit(_value_and_grads("auto")).lower(*placed).compile()
        for key, value in zip(("out", "dq", "dk", "dv", "dbias"), compiled(*placed), strict=True):
            arrays[f"{name}/{key}"] = np.asarray(value)
        hlo = compiled.as_text()
        report[name] = {"all_gather": "all-gather" in hlo, "native": native_attention.CROSS_BACKWARD in hlo}
    np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _run_child(sys.argv[1])
