"""Linear-attention kernels: the jnp paths and the C++ kernels in-process, the Triton kernels under Triton's
interpreter.

The Triton half runs in one child process (this file run as a script) with TRITON_INTERPRET=1 and four
host devices. There `jax_triton.triton_call` is stood in for by a `jax.pure_callback` that launches the
same kernel with plain `kernel[grid](...)` on torch CPU tensors, so the JAX launchers, the custom_vjp
and its vmap rule run the real kernel bodies; under sharding the Triton path is compiled and its
program inspected. Results are checked here against the quadratic form of the attention in torch
float64 and its autograd gradients.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sana_jax.kernels import linear_attention, linear_attention_xla

EPS = 1e-15
# Normwise relative errors allowed against the float64 reference. bf16 cases start from bf16 inputs
# (so the reference sees the same values) and end in bf16 outputs and gradients: 2^-8 rounding.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}

# Interpreter cases: (tokens, head dim, dtype, (block_n, splits)); splits 1 is the fused kernel pair.
# Batch 2 x 2 heads. Kept small: the interpreter runs each program in Python.
INTERPRETED = {
    f"n{n}-d{d}-{dtype}-{'fused' if s == 1 else f'split{s}'}-block{b}": (n, d, dtype, (b, s))
    for n, d, dtype, (b, s) in [
        (1, 32, "float32", (16, 1)), (37, 32, "float32", (32, 1)), (300, 32, "float32", (64, 2)),
        (1, 64, "float32", (16, 2)), (37, 64, "float32", (32, 1)), (300, 64, "bfloat16", (64, 1)),
        (1, 128, "float32", (16, 1)), (37, 128, "float32", (16, 2)), (37, 128, "bfloat16", (32, 1)),
        (37, 32, "bfloat16", (32, 2)),
    ]}
# Sharded runs in the child: mesh shape, axis names, input PartitionSpec, axis type.
MESHES = {"batch": ((4,), ("data",), ("data",), "Auto"),
          "batch-explicit": ((4,), ("data",), ("data",), "Explicit"),
          "batch-and-heads": ((2, 2), ("data", "model"), ("data", None, "model"), "Auto"),
          "tokens": ((4,), ("data",), (None, "data"), "Auto")}


def _inputs(seed: int, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, ...]:
    """q, k, v, dout: standard normals (float32, or bf16-rounded values held as float32)."""
    arrays = np.random.default_rng(seed).standard_normal((4, *shape)).astype(np.float32)
    return tuple(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in arrays)


def _torch_reference(q, k, v, dout, eps=EPS):
    """Output and (dq, dk, dv) of the quadratic form o_i = sum_j s_ij v_j / (sum_j s_ij + eps), float64."""
    q, k, v = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q.relu(), k.relu())
    norm = scores.sum(-1).transpose(1, 2)[..., None] + eps
    out = torch.einsum("bhij,bjhe->bihe", scores, v) / norm
    out.backward(torch.tensor(np.asarray(dout, np.float64)))
    return out.detach().numpy(), (q.grad.numpy(), k.grad.numpy(), v.grad.numpy())


def _error(actual, expected, floor) -> float:
    """||actual - expected|| / max(||expected||, floor); the floor keeps gradients that are
    zero up to rounding (one token: o = v, whatever q and k) from dividing by ~0."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), floor))


def _assert_matches(out, grads, q, k, v, dout, tolerance):
    expected_out, expected_grads = _torch_reference(q, k, v, dout)
    floor = float(np.linalg.norm(dout))
    errors = {"out": _error(out, expected_out, 0.0)}
    errors.update({name: _error(g, e, floor)
                   for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads, strict=True)})
    assert max(errors.values()) < tolerance, errors


# ----------------------------------------------------------------------------- jnp paths, in-process


@pytest.fixture(scope="module")
def data():
    return tuple(jnp.asarray(x) for x in _inputs(0, (2, 37, 3, 8), "float32"))


def _grads(attention, q, k, v, dout):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(dout)


@jax.jit
def _reference_grads(q, k, v, dout):
    return _grads(linear_attention_xla, q, k, v, dout)


def test_reference_matches_quadratic_form(data):
    q, k, v, dout = data
    out, grads = _reference_grads(q, k, v, dout)
    _assert_matches(out, grads, q, k, v, dout, TOLERANCE["float32"])


def test_reference_keeps_bf16():
    q, k, v, _ = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(1, (1, 5, 2, 8), "bfloat16"))
    assert linear_attention_xla(q, k, v).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_custom_vjp_matches_reference_autodiff(dtype):
    q, k, v, dout = (jnp.asarray(x, dtype) for x in _inputs(2, (2, 37, 3, 8), dtype))
    out, grads = jax.jit(lambda *a: _grads(lambda *x: linear_attention(*x, impl="xla"), *a))(q, k, v, dout)
    ref_out, ref_grads = _reference_grads(q, k, v, dout)
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    floor = float(jnp.linalg.norm(dout.astype(jnp.float32)))
    assert _error(out, np.asarray(ref_out, np.float64), 0.0) < TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads, strict=True):
        assert _error(g, np.asarray(r.astype(jnp.float32), np.float64), floor) < TOLERANCE[dtype]
    # And against the independent float64 form.
    _assert_matches(out, grads, *(x.astype(jnp.float32) for x in (q, k, v, dout)), TOLERANCE[dtype])


# Head dims the C++ kernels take (multiples of 16 up to 128), odd token counts, one token.
NATIVE_SHAPES = [(2, 37, 3, 16), (1, 1, 1, 32), (2, 300, 2, 64), (1, 5, 2, 128), (2, 9, 1, 48)]


@pytest.mark.parametrize("shape", NATIVE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_float64_reference(shape):
    q, k, v, dout = (jnp.asarray(x) for x in _inputs(3, shape, "float32"))
    out, grads = jax.jit(lambda *a: _grads(lambda *x: linear_attention(*x, impl="native"), *a))(q, k, v, dout)
    _assert_matches(out, grads, q, k, v, dout, TOLERANCE["float32"])


@pytest.fixture(scope="module")
def data16():
    return tuple(jnp.asarray(x) for x in _inputs(4, (2, 37, 3, 16), "float32"))


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_custom_vjp_under_vmap_with_an_unmapped_argument(data16, impl):
    q, k, v, dout = data16
    qs, ks, douts = jnp.stack([q, 2 * q]), jnp.stack([k, -k]), jnp.stack([dout, dout[::-1]])

    def per_example(attention):
        return jax.jit(jax.vmap(lambda q, k, g: _grads(attention, q, k, v, g), in_axes=(0, 0, 0)))

    out, grads = per_example(lambda *x: linear_attention(*x, impl=impl))(qs, ks, douts)
    for i in range(2):
        _assert_matches(out[i], [g[i] for g in grads], qs[i], ks[i], v, douts[i], TOLERANCE["float32"])


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_grad_of_vmap_and_remat_match_reference(data16, impl):
    q, k, v, _ = data16

    def loss(attention):
        per_view = jax.vmap(jax.checkpoint(attention), in_axes=(0, None, None))
        return lambda q, k, v: jnp.sum(jnp.sin(per_view(jnp.stack([q, q[:, ::-1]]), k, v)))

    grads = jax.jit(jax.grad(loss(lambda *x: linear_attention(*x, impl=impl)), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(linear_attention_xla), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(grads, expected, strict=True):
        assert _error(g, np.asarray(e, np.float64), 0.0) < TOLERANCE["float32"]


def test_bad_inputs_name_the_problem(data):
    q, k, v, _ = data
    with pytest.raises(ValueError, match="impl='cuda'"):
        linear_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match=r"'k': \(2, 36, 3, 8\)"):
        linear_attention(q, k[:, 1:], v)
    with pytest.raises(ValueError, match="bfloat16"):
        linear_attention(q, k.astype(jnp.bfloat16), v)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the choice made without a GPU")
def test_auto_runs_native_where_it_can_else_xla_and_says_why(data, data16, caplog):
    module = importlib.import_module("sana_jax.kernels.native_attention")
    q, k, v, _ = data16
    hlo = jax.jit(jax.grad(lambda q: jnp.sum(linear_attention(q, k, v, impl="auto")))).lower(q).as_text()
    assert module.LINEAR_FORWARD in hlo and module.LINEAR_BACKWARD in hlo
    q, k, v, _ = data  # head dim 8
    with caplog.at_level(logging.DEBUG, logger="sana_jax.kernels.linear_attention"):
        out = linear_attention(q, k, v, impl="auto")
    assert "XLA, since head dim 8 is not a multiple of 16 up to 128" in caplog.text
    np.testing.assert_allclose(out, jax.jit(linear_attention_xla)(q, k, v), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="impl='triton'.*not 'gpu'"):
        linear_attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="impl='native'.*head dim 8"):
        linear_attention(q, k, v, impl="native")
    with pytest.raises(ValueError, match="impl='native'.*dtype bfloat16 is not float32"):
        linear_attention(*(x.astype(jnp.bfloat16) for x in data16[:3]), impl="native")


def test_launch_table_splits_tokens_only_when_heads_are_few():
    from sana_jax.kernels import triton_linear_attention as kernels

    for head_dim in kernels.HEAD_DIMS:
        many = kernels.launch_config(16 * 70, 4096, head_dim, jnp.bfloat16)  # SANA training: a program per head
        assert many.splits == 1 and many.block_n >= 16
        few = kernels.launch_config(2 * 70, 4096, head_dim, jnp.bfloat16)  # batch 2: split the tokens
        assert few.splits > 1 and 2 * 70 * few.splits >= kernels.TARGET_PROGRAMS
        for tokens in (1, 37, 300, 1000, 4096):
            split_tokens, splits = dataclasses.replace(few, splits=3).split(tokens)
            assert split_tokens % few.block_n == 0 and 1 <= splits <= 3
            assert (splits - 1) * split_tokens < tokens <= splits * split_tokens
    with pytest.raises(ValueError, match="head dim 48"):
        kernels.launch_config(8, 64, 48, jnp.float32)


# Shared memory one program may use on Hopper (H100, H200): 227 KiB. On an H200, a d = 128 backward that
# asked for 344064 B failed to launch.
HOPPER_SHARED_MEMORY = 232448


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_launch_table_fits_hopper_shared_memory(head_dim, dtype, tmp_path, monkeypatch):
    """Every kernel, compiled for sm_90 at the table's config (Triton's own ptxas; no GPU needed), fits."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sana_jax.kernels import triton_linear_attention as kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    names = {"float32": "fp32", "bfloat16": "bf16"}
    config = kernels.launch_config(16 * 70, 4096, head_dim, jnp.dtype(dtype))
    meta = {"D": head_dim, "BLOCK_N": config.block_n, "PRECISION": config.precision}

    def argument_type(name):
        if name in meta:
            return "constexpr"
        if name.endswith("_ptr"):  # states and key sums are float32 whatever the inputs
            return "*fp32" if "state" in name or "key_sum" in name else f"*{names[dtype]}"
        return "fp32" if name == "eps" else "i32"

    shared = {}
    for kernel in (kernels._forward_kernel, kernels._partial_state_kernel, kernels._output_kernel,
                   kernels._backward_kernel, kernels._query_grad_kernel, kernels._key_grad_kernel):
        parameters = list(inspect.signature(kernel.fn).parameters)
        source = ASTSource(kernel, {name: argument_type(name) for name in parameters},
                           constexprs={(parameters.index(name),): value for name, value in meta.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        shared[kernel.fn.__name__] = compiled.metadata.shared
    assert max(shared.values()) <= HOPPER_SHARED_MEMORY, (config, shared)


# ----------------------------------------------------------------------------- tools/bench_gpu.py

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "bench_gpu.py")


def test_bench_gpu_help_runs_without_a_gpu():
    done = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--budget-s" in done.stdout


@pytest.mark.slow
def test_bench_gpu_dry_run_times_every_section(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, BENCH, "--dry-run", "--out", str(out), "--seed", "3"],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["environment"]["backend"] == "cpu" and results["kernels"]["copy_tb_s"] > 0
    assert results["check"]["all_pass"] and len(results["check"]["cases"]) == 2  # d=32 x (fp32, bf16)
    for name in ("xla", "xla_custom_vjp"):
        for direction in ("forward", "forward+backward"):
            assert results["kernels"][f"{name}/{direction}/n37"]["us"] > 0
    for name in ("xla/forward/b2", "xla/train_step/b2", "xla/forward/b2/bf16_params"):
        assert results["model"][name]["ms"] > 0
    profile = results["profile"]  # the training step's op time: the ops' rows add up to the kinds' total
    assert profile["op_ms"] > 0 and profile["ops"][0]["ms"] >= profile["ops"][-1]["ms"]
    assert sum(profile["by_kind"].values()) == pytest.approx(profile["op_ms"])
    for name in ("eager/forward/b2", "eager/train_step/b2"):
        assert results["diffusers"][name]["ms"] > 0
    torch_ops = results["diffusers"]["eager/train_step/b2/ops"]  # torch.profiler: the products are there
    assert torch_ops["op_ms"] > 0 and any(op["op"] in ("aten::mm", "aten::addmm") for op in torch_ops["ops"])
    assert "Triton unavailable" in results["sweep"]["stopped"]["skipped"]
    table = done.stdout.split("[bench_gpu] sweep")[1]
    assert "check  2 cases" in table and "model  xla/train_step/b2" in table and "ms of op time" in table


# ----------------------------------------------------------------------------- interpreter, child process


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """Runs this file as a script under Triton's interpreter on four host devices; returns its results."""
    out_dir = tmp_path_factory.mktemp("interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, __file__, str(out_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with np.load(out_dir / "arrays.npz") as arrays:
        return dict(arrays), json.loads((out_dir / "report.json").read_text())


@pytest.mark.parametrize("case", INTERPRETED)
def test_interpreted_kernels_match_float64_reference(child, case):
    arrays, report = child
    dtype = INTERPRETED[case][2]
    q, k, v, dout = (arrays[f"{case}/{name}"] for name in ("q", "k", "v", "dout"))
    _assert_matches(arrays[f"{case}/out"], [arrays[f"{case}/{n}"] for n in ("dq", "dk", "dv")],
                    q, k, v, dout, TOLERANCE[dtype])
    assert [report[f"{case}/{n}"] for n in ("out", "dq", "dk", "dv")] == [dtype] * 4


def test_interpreted_custom_vjp_under_jit_and_vmap(child):
    arrays, _ = child
    q, k, v, dout = (arrays[f"vmap/{name}"] for name in ("q", "k", "v", "dout"))
    for i in range(q.shape[0]):
        _assert_matches(arrays["vmap/out"][i], [arrays[f"vmap/{n}"][i] for n in ("dq", "dk", "dv")],
                        q[i], k[i], v[i], dout[i], TOLERANCE["float32"])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_inputs_stay_sharded(child, mesh):
    arrays, report = child
    q, k, v, dout = (arrays[f"sharded/{n}"] for n in ("q", "k", "v", "dout"))
    name = f"sharded-{mesh}"
    _assert_matches(arrays[f"{name}/out"], [arrays[f"{name}/{n}"] for n in ("dq", "dk", "dv")],
                    q, k, v, dout, TOLERANCE["float32"])
    _assert_matches(arrays[f"{name}-native/out"], [arrays[f"{name}-native/{n}"] for n in ("dq", "dk", "dv")],
                    q, k, v, dout, TOLERANCE["float32"])
    shape, axes, spec, _ = MESHES[mesh]
    spec = list(spec) + [None] * (4 - len(spec))
    kept = [spec[0], None, spec[2], None]  # batch and head shardings pass, a token sharding cannot
    assert report[name]["grad_spec"] == report[f"{name}-native"]["grad_spec"] == spec
    assert report[f"{name}-native"]["native"]
    assert (report[name]["all_gather"] == report[f"{name}-native"]["all_gather"]
            == report[f"{name}-triton"]["all_gather"] == (kept != spec))
    # The Triton path compiles to kernel calls on each device's shard of (4, 36, 4, 32).
    sizes = dict(zip(axes, shape, strict=True))
    batch, tokens, heads, head_dim = (
        n // sizes.get(axis, 1) for n, axis in zip((4, 36, 4, 32), kept, strict=True))
    assert sorted(report[f"{name}-triton"]["kernel_operand_shapes"]) == sorted(
        [[batch, tokens, heads, head_dim], [batch, heads, head_dim, head_dim]])


# ----------------------------------------------------------------------------- the child


_INTERPRETER_LOCK = threading.Lock()  # The interpreter's state is global; devices call in parallel.


def _interpreted_triton_call(*args, kernel, out_shape, grid, name="", **launch):
    """`jax_triton.triton_call`'s contract, run by Triton's interpreter on host torch tensors."""
    del name
    shapes = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
    is_array = [not isinstance(a, (bool, int, float, np.floating)) for a in args]
    torch_dtypes = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16}

    def to_torch(x):
        x = np.array(x)
        if x.dtype == jnp.bfloat16:
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def to_numpy(x):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(jnp.bfloat16)
        return x.numpy()

    def host(*arrays):
        arrays = iter(arrays)
        call = [to_torch(next(arrays)) if array else (float(a) if isinstance(a, np.floating) else a)
                for a, array in zip(args, is_array, strict=True)]
        outs = [torch.empty(s.shape, dtype=torch_dtypes[jnp.dtype(s.dtype)]) for s in shapes]
        with _INTERPRETER_LOCK:
            kernel[grid](*call, *outs, **launch)
        return tuple(to_numpy(o) for o in outs)

    outs = jax.pure_callback(host, shapes, *(a for a, array in zip(args, is_array, strict=True) if array))
    return outs if isinstance(out_shape, (tuple, list)) else outs[0]


def _run_child(out_dir: str) -> None:
    import importlib
    import types

    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from sana_jax.kernels import triton_linear_attention as kernels

    dispatch = importlib.import_module("sana_jax.kernels.linear_attention")

    sys.modules["jax_triton"] = types.SimpleNamespace(triton_call=_interpreted_triton_call)
    arrays, report = {}, {}

    def save(prefix, **values):  # bf16 travels as float32 (exact), its dtype in the report
        for key, value in values.items():
            arrays[f"{prefix}/{key}"] = np.asarray(value.astype(jnp.float32))
            report[f"{prefix}/{key}"] = value.dtype.name

    for seed, (case, (tokens, head_dim, dtype, (block_n, splits))) in enumerate(INTERPRETED.items()):
        q, k, v, dout = (jnp.asarray(x, dtype) for x in _inputs(seed, (2, tokens, 2, head_dim), dtype))
        config = kernels.LaunchConfig(block_n=block_n, splits=splits, num_warps=4, num_stages=2,
                                      precision=kernels.input_precision(dtype, head_dim))
        out, state, key_sum = kernels.forward(q, k, v, EPS, config)
        dq, dk, dv = kernels.backward(q, k, v, state, key_sum, dout, EPS, config)
        save(case, q=q, k=k, v=v, dout=dout, out=out, dq=dq, dk=dk, dv=dv)

    def grads(impl):
        return lambda q, k, v, g: _grads(lambda *x: dispatch._linear_attention(*x, EPS, impl), q, k, v, g)

    q, k, v, dout = (jnp.asarray(x) for x in _inputs(100, (2, 2, 37, 2, 32), "float32"))
    out, (dq, dk, dv) = jax.jit(jax.vmap(grads("triton")))(q, k, v, dout)
    save("vmap", q=q, k=k, v=v, dout=dout, out=out, dq=dq, dk=dk, dv=dv)

    # Sharded: the jnp path and the C++ kernels run; the Triton path is compiled only, since host callbacks made
    # inside a custom_partitioning rule are not kept alive by the executable (a jax_triton call is no callback).
    q, k, v, dout = (jnp.asarray(x) for x in _inputs(200, (4, 36, 4, 32), "float32"))
    save("sharded", q=q, k=k, v=v, dout=dout)
    for mesh_name, (shape, axes, spec, axis_type) in MESHES.items():
        mesh = jax.make_mesh(shape, axes, axis_types=(getattr(AxisType, axis_type),) * len(shape))
        placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec))) for x in (q, k, v, dout)]
        compiled = jax.jit(grads("xla")).lower(*placed).compile()
        out, (dq, dk, dv) = compiled(*placed)
        save(f"sharded-{mesh_name}", out=out, dq=dq, dk=dk, dv=dv)
        report[f"sharded-{mesh_name}"] = {
            "grad_spec": list(dq.sharding.spec) + [None] * (4 - len(dq.sharding.spec)),
            "all_gather": "all-gather" in compiled.as_text()}
        compiled = jax.jit(grads("native")).lower(*placed).compile()
        out, (dq, dk, dv) = compiled(*placed)
        save(f"sharded-{mesh_name}-native", out=out, dq=dq, dk=dk, dv=dv)
        report[f"sharded-{mesh_name}-native"] = {
            "grad_spec": list(dq.sharding.spec) + [None] * (4 - len(dq.sharding.spec)),
            "all_gather": "all-gather" in compiled.as_text(),
            "native": "sana_linear_attention_backward" in compiled.as_text()}
        hlo = jax.jit(grads("triton")).lower(*placed).compile().as_text()
        calls = [line for line in hlo.splitlines() if "xla_ffi_python_cpu_callback" in line]
        shapes = {shape for line in calls for shape in re.findall(r"\[(\d+),(\d+),(\d+),(\d+)\]", line)}
        report[f"sharded-{mesh_name}-triton"] = {
            "all_gather": "all-gather" in hlo,
            "kernel_operand_shapes": [list(map(int, shape)) for shape in shapes]}
    np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


def test_repository_root_does_not_hide_the_installed_kernels_distribution():
    """Run from the repository root, `import kernels` means the `kernels` distribution (transformers imports
    it) when one is installed, and this folder otherwise."""
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    try:
        expected = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        expected = root / "kernels" / "__init__.py"
    assert Path(found).resolve() == Path(expected).resolve()


if __name__ == "__main__":
    _run_child(sys.argv[1])
