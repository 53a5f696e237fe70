"""One-call GPU benchmark of the linear-attention kernels and the SANA 1.5 1.6B model.

Sections, in their default order (`--sections` picks and orders them); every measurement is guarded
(a failure is recorded and the rest runs) and is skipped once the time budget would be overrun:

  environment  backend, device, package versions, and whether the Triton path can run.
  check        Triton kernels vs the float32 reference on fresh random inputs: forward and gradients,
               fused and split launches and the custom_vjp, d = 32, 64, 128, fp32 and bf16. A NaN fails.
  kernels      linear attention alone at SANA shapes (B=16, H=70, d=32, bf16, N=1024 and 4096):
               forward and forward+backward of XLA autodiff, XLA with the closed-form backward, and
               Triton, with the HBM bandwidth each achieves (bytes it must move / time) against a
               large bf16 copy timed in the same process and the card's nominal figure.
  model        sana1.5_1600m forward (batch 2 and 16; 32x32 latent, 300 text tokens, bf16 compute) and
               a training step (batch 8, forward + backward of the flow-matching MSE, no optimizer),
               attention_impl "xla" vs "triton"; and the forward on the same weights stored in bf16.
  profile      that training step's op time per HLO instruction on the device (a jax.profiler trace),
               summed by kind (fusion kind, custom-call target), and its costliest instructions.
  diffusers    SanaTransformer2DModel (bf16, same random weights and inputs), eager and torch.compile,
               with the training step's self time per kernel (torch.profiler) beside the profile section's.
  sweep        kernel launch configs around the autotune table's choice at the SANA shapes.

Each section runs in its own process (this script, with $BENCH_GPU_SECTION naming the section), so a
crash costs one section and every section starts with the whole GPU: JAX's allocator keeps what it once
used, which torch then could not have. Prints one table last and writes JSON to --out (default $OUT/bench_gpu.json),
rewritten after every section. --dry-run runs the same harness on tiny shapes and the "tiny" preset
(CPU is enough).

  python tools/bench_gpu.py --budget-s 540
  python tools/bench_gpu.py --dry-run --out /tmp/bench_gpu.json
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sana_jax import cli
from sana_jax.benchmarking import median_ms, op_profile, op_time_by_kind

SECTIONS = ("environment", "check", "kernels", "model", "profile", "diffusers", "sweep")
PACKAGES = ("jax", "jaxlib", "jax-triton", "triton", "torch", "diffusers", "numpy")
# Nominal HBM bandwidth by device-kind substring, bytes/s.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
EPS = 1e-15
# Set in a child's environment: the one section it runs.
SECTION_VARIABLE = "BENCH_GPU_SECTION"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Problem sizes: FULL is the benchmark, TINY the --dry-run harness check."""

    attention_batch: int
    attention_heads: int
    attention_tokens: tuple[int, ...]
    check_head_dims: tuple[int, ...]
    check_tokens: tuple[int, ...]
    preset: str
    latent: int
    text_tokens: int
    forward_batches: tuple[int, ...]
    train_batch: int
    copy_bytes: int


FULL = Shapes(attention_batch=16, attention_heads=70, attention_tokens=(1024, 4096),
              check_head_dims=(32, 64, 128), check_tokens=(1, 37, 1000), preset="sana1.5_1600m", latent=32,
              text_tokens=300, forward_batches=(2, 16), train_batch=8, copy_bytes=2**30)
TINY = Shapes(attention_batch=2, attention_heads=2, attention_tokens=(37,), check_head_dims=(32,),
              check_tokens=(37,), preset="tiny", latent=8, text_tokens=12, forward_batches=(2,),
              train_batch=2, copy_bytes=2**20)
Timer = Callable[[Callable[[], Any], Callable[[Any], Any]], float]


class Skip(Exception):
    """A measurement that cannot run here or now; recorded as skipped, not as an error."""


class Budget:
    """The wall-clock budget all sections share."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def require(self, seconds: float, what: str) -> None:
        """Raises Skip unless ~`seconds` (a guess at `what`'s cost) are left."""
        if self.left() < seconds:
            raise Skip(f"{what}: {self.left():.0f} s of the budget left, needs ~{seconds:.0f} s")


@dataclasses.dataclass(frozen=True)
class Run:
    """What every section gets: sizes, budget, timer, the check seed, and whether to torch.compile."""

    shapes: Shapes
    budget: Budget
    timer: Timer
    seed: int
    torch_compile: bool


def guarded(results: dict, key: str, fn: Callable[[], Any]) -> None:
    """results[key] = fn(), or what stopped it; never raises. Prints a line either way."""
    try:
        results[key] = fn()
    except Skip as e:
        results[key] = {"skipped": str(e)}
    except Exception as e:  # one failure must not lose the other measurements
        results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    if results[key] is not None:
        print(f"[bench_gpu]   {key}: {json.dumps(results[key], default=str)[:300]}", flush=True)


def relative_error(actual: jax.Array, expected: jax.Array, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64; NaN when actual is not finite."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if not np.all(np.isfinite(actual)):
        return math.nan
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), floor, 1e-30))


def random_arrays(key: jax.Array, shape: tuple[int, ...], dtype, count: int = 4) -> list[jax.Array]:
    """`count` standard-normal arrays, cast to dtype."""
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in jax.random.split(key, count)]


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here (bf16, d=32), or None."""
    from sana_jax.kernels import triton_unsupported

    return triton_unsupported(jnp.zeros((1, 1, 1, 32), jnp.bfloat16))


# ----------------------------------------------------------------------------- sections


def environment(out: dict, run: Run) -> None:
    """Backend, device, package versions and whether the Triton path can run."""
    del run  # nothing to size or time
    device = jax.devices()[0]
    out.update(backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count(),
               triton_unavailable=triton_unavailable())
    out["versions"] = {}
    for name in PACKAGES:
        try:
            out["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out["versions"][name] = None


def check(out: dict, run: Run) -> None:
    """Relative errors of every path against the float32 (HIGHEST precision) reference.

    Gradient errors are relative to max(||expected||, ||dout||): with one token the output is v
    whatever q and k are, so dq and dk are zero up to rounding.
    """
    from sana_jax.kernels import linear_attention, linear_attention_xla
    from sana_jax.kernels import triton_linear_attention as kernels

    reason = triton_unavailable()
    # XLA's default precision on a GPU runs float32 products on TF32 tensor cores (operands rounded to
    # 2^-11), which an H200 measured at 2.2-2.8e-4 relative error in the output.
    tolerance = {"float32": 1e-4, "bfloat16": 2e-2, "float32 through XLA on a GPU": 1e-3}
    out.update(seed=run.seed, triton_unavailable=reason, tolerance=tolerance, cases={})

    @jax.jit
    def reference(q, k, v, dout):
        q, k, v, dout = (x.astype(jnp.float32) for x in (q, k, v, dout))
        with jax.default_matmul_precision("highest"):
            result, vjp = jax.vjp(lambda *x: linear_attention_xla(*x, EPS), q, k, v)
            return result, vjp(dout)

    def through_custom_vjp(impl):
        def run(q, k, v, dout):
            result, vjp = jax.vjp(lambda *x: linear_attention(*x, eps=EPS, impl=impl), q, k, v)
            return result, vjp(dout)
        return jax.jit(run)

    def through_launchers(config):
        def run(q, k, v, dout):
            result, state, key_sum = kernels.forward(q, k, v, EPS, config)
            return result, kernels.backward(q, k, v, state, key_sum, dout, EPS, config)
        return jax.jit(run)

    def case(path, inputs, expected, limit):
        result, grads = path(*inputs)
        floor = float(jnp.linalg.norm(inputs[3].astype(jnp.float32)))
        errors = {"out": relative_error(result, expected[0])}
        errors.update({n: relative_error(g, e, floor)
                       for n, g, e in zip(("dq", "dk", "dv"), grads, expected[1], strict=True)})
        return {**errors, "pass": all(e < limit for e in errors.values())}  # NaN fails

    for head_dim in run.shapes.check_head_dims:
        for dtype in ("float32", "bfloat16"):
            paths = {"xla_custom_vjp": through_custom_vjp("xla")}
            if reason is None:
                table = kernels.launch_config(1, 1, head_dim, jnp.dtype(dtype))
                paths["triton_custom_vjp"] = through_custom_vjp("triton")
                paths["triton_fused"] = through_launchers(dataclasses.replace(table, splits=1))
                paths["triton_split3"] = through_launchers(dataclasses.replace(table, splits=3))
            for tokens in run.shapes.check_tokens:
                key = jax.random.fold_in(jax.random.key(run.seed), tokens * 1000 + head_dim)
                inputs = random_arrays(key, (2, tokens, 3, head_dim), jnp.dtype(dtype))
                expected = reference(*inputs)
                for name, path in paths.items():
                    run.budget.require(5, "the remaining checks")
                    tf32 = name.startswith("xla") and dtype == "float32" and jax.default_backend() == "gpu"
                    limit = tolerance["float32 through XLA on a GPU" if tf32 else dtype]
                    guarded(out["cases"], f"{name}/d{head_dim}/{dtype}/n{tokens}",
                            lambda p=path, i=inputs, e=expected, m=limit: case(p, i, e, m))
    out["all_pass"] = all(c.get("pass", False) for c in out["cases"].values())


def attention(out: dict, run: Run) -> None:
    """Forward and forward+backward times and achieved bandwidth of the linear-attention paths,
    against a large bf16 device-to-device copy timed in the same process (and the card's nominal)."""
    from sana_jax.kernels import linear_attention, linear_attention_xla

    shapes, timer = run.shapes, run.timer
    ones = jnp.ones((shapes.copy_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)
    copy_ms = timer(lambda: copy(ones), jax.block_until_ready)
    out["copy_tb_s"] = copy_tb_s = 2 * shapes.copy_bytes / copy_ms * 1e-9
    kind = jax.devices()[0].device_kind
    nominal = next((bw for name, bw in NOMINAL_BANDWIDTH.items() if name in kind), None)
    out["nominal_tb_s"] = nominal_tb_s = nominal * 1e-12 if nominal else None

    out["triton_unavailable"] = reason = triton_unavailable()
    impls = {"xla": lambda *x: linear_attention_xla(*x, EPS),
             "xla_custom_vjp": lambda *x: linear_attention(*x, eps=EPS, impl="xla")}
    if reason is None:
        impls["triton"] = lambda *x: linear_attention(*x, eps=EPS, impl="triton")

    def measure(call, args, moved):
        ms = timer(lambda: call(*args), jax.block_until_ready)
        tb_s = moved / ms * 1e-9
        return {"us": 1e3 * ms, "bytes": moved, "tb_s": tb_s,
                "of_copy": tb_s / copy_tb_s if copy_tb_s else None,
                "of_nominal": tb_s / nominal_tb_s if nominal_tb_s else None}

    for tokens in shapes.attention_tokens:
        shape = (shapes.attention_batch, tokens, shapes.attention_heads, 32)
        q, k, v, dout = random_arrays(jax.random.key(tokens), shape, jnp.bfloat16)
        # Bytes each direction must move: read q, k, v and write out; then read q, k, v, dout and
        # write dq, dk, dv.
        size = math.prod(shape) * 2
        for name, fn in impls.items():
            forward = jax.jit(fn)
            forward_backward = jax.jit(lambda q, k, v, g, fn=fn: jax.vjp(fn, q, k, v)[1](g))
            for direction, call, args, moved in (("forward", forward, (q, k, v), 4 * size),
                                                 ("forward+backward", forward_backward, (q, k, v, dout),
                                                  11 * size)):
                run.budget.require(10, f"{name} {direction} at N={tokens}")
                guarded(out, f"{name}/{direction}/n{tokens}",
                        lambda c=call, a=args, m=moved: measure(c, a, m))


def _model_inputs(config, batch: int, shapes: Shapes) -> dict[str, np.ndarray]:
    """One batch, the same for JAX and torch: clean latents (B, h, w, C), noise like them, noise levels
    sigmas (B,) and model timesteps floor(1000 sigma), text (B, L, C_text), mask (B, L)."""
    rng = np.random.default_rng(batch)
    latent_shape = (batch, shapes.latent, shapes.latent, config.in_channels)
    sigmas = rng.uniform(0, 1, batch).astype(np.float32)
    return {"latents": rng.standard_normal(latent_shape, np.float32),
            "noise": rng.standard_normal(latent_shape, np.float32),
            "sigmas": sigmas, "timesteps": np.floor(1000 * sigmas),
            "text": rng.standard_normal((batch, shapes.text_tokens, config.caption_channels), np.float32),
            "mask": np.ones((batch, shapes.text_tokens), np.int32)}


def _model_config(shapes: Shapes):
    from sana_jax.model import preset

    return dataclasses.replace(preset(shapes.preset), sample_size=shapes.latent, compute_dtype="bfloat16")


@functools.partial(jax.jit, static_argnums=1)
def _velocity(params, config, x: dict):
    from sana_jax.model import forward

    return forward(params, config, x["latents"], x["timesteps"], x["text"], x["mask"])


@functools.partial(jax.jit, static_argnums=1)
def _train_step(params, config, x: dict):
    """Loss and gradients of the flow-matching MSE mean((v(x_t, t) - (noise - x0))^2),
    x_t = (1 - sigma) x0 + sigma noise."""
    from sana_jax.model import forward

    def loss(params):
        sigmas = x["sigmas"][:, None, None, None]
        noisy = (1 - sigmas) * x["latents"] + sigmas * x["noise"]
        predicted = forward(params, config, noisy, x["timesteps"], x["text"], x["mask"])
        return jnp.mean(jnp.square(predicted - (x["noise"] - x["latents"])))
    return jax.value_and_grad(loss)(params)


def model(out: dict, run: Run) -> None:
    """sana_jax.model forward and training-step times, attention_impl "xla" vs "triton".

    Parameters are float32 and cast to bfloat16 at every call, as in training; the forward is also
    timed on the same weights stored in bfloat16 (`bf16_params`), as a sampler holds them and as the
    diffusers section runs. The training step is forward + backward (no optimizer, `_train_step`).
    """
    from sana_jax.model import init_params

    shapes = run.shapes
    base = _model_config(shapes)
    out["config"] = dataclasses.asdict(base)
    out["triton_unavailable"] = reason = triton_unavailable()
    params = jax.jit(init_params, static_argnums=0)(base, jax.random.key(0))

    def time_call(call, params, config, batch):
        inputs = jax.tree.map(jnp.asarray, _model_inputs(config, batch, shapes))
        ms = run.timer(lambda: call(params, config, inputs), jax.block_until_ready)
        return {"ms": ms, "images_per_s": batch / ms * 1e3}

    impls = ("xla", "triton") if reason is None else ("xla",)
    for impl in impls:
        config = dataclasses.replace(base, attention_impl=impl)
        for batch in shapes.forward_batches:
            run.budget.require(30, f"the {impl} forward at batch {batch}")
            guarded(out, f"{impl}/forward/b{batch}",
                    lambda c=config, b=batch: time_call(_velocity, params, c, b))
        run.budget.require(60, f"the {impl} training step")
        guarded(out, f"{impl}/train_step/b{shapes.train_batch}",
                lambda c=config: time_call(_train_step, params, c, shapes.train_batch))
    config = dataclasses.replace(base, attention_impl=impls[-1], param_dtype="bfloat16")
    bf16_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))(params)
    for batch in shapes.forward_batches:
        run.budget.require(30, f"the bf16-parameter forward at batch {batch}")
        guarded(out, f"{config.attention_impl}/forward/b{batch}/bf16_params",
                lambda b=batch: time_call(_velocity, bf16_params, config, b))


def profile(out: dict, run: Run) -> None:
    """Where the model section's training step spends its time: op time per HLO instruction on the device
    (`sana_jax.benchmarking.op_profile`, 3 traced steps), summed by kind, and the costliest instructions."""
    from sana_jax.model import init_params

    shapes = run.shapes
    impl = "triton" if triton_unavailable() is None else "xla"
    config = dataclasses.replace(_model_config(shapes), attention_impl=impl)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    inputs = jax.tree.map(jnp.asarray, _model_inputs(config, shapes.train_batch, shapes))
    run.budget.require(60, "the training step's profile")
    step = _train_step.lower(params, config, inputs).compile()
    jax.block_until_ready(step(params, inputs))
    ops = op_profile(step, params, inputs, calls=3)
    out.update(attention_impl=impl, batch=shapes.train_batch, op_ms=sum(op.ms for op in ops),
               by_kind=op_time_by_kind(ops), ops=[dataclasses.asdict(op) for op in ops[:40]])


def diffusers_model(out: dict, run: Run) -> None:
    """diffusers SanaTransformer2DModel in bf16 on the model section's weights, inputs and workloads."""
    import torch
    from diffusers import SanaTransformer2DModel

    from sana_jax.convert import config_to_diffusers, params_to_state_dict
    from sana_jax.model import init_params

    shapes = run.shapes
    config = _model_config(shapes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["device"] = device
    state = params_to_state_dict(jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)), config)
    with torch.device(device):
        net = SanaTransformer2DModel.from_config(config_to_diffusers(config))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    del state
    net = net.to(torch.bfloat16)

    def sync(result):
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    def inputs(batch):
        x = {k: torch.from_numpy(v).to(device) for k, v in _model_inputs(config, batch, shapes).items()}
        for name in ("latents", "noise"):  # NHWC -> NCHW
            x[name] = x[name].permute(0, 3, 1, 2).to(torch.bfloat16)
        x["text"] = x["text"].to(torch.bfloat16)
        return x

    def time_forward(module, batch):
        x = inputs(batch)

        @torch.no_grad()
        def call():
            return module(x["latents"], x["text"], x["timesteps"], encoder_attention_mask=x["mask"],
                          return_dict=False)[0]

        ms = run.timer(call, sync)
        return {"ms": ms, "images_per_s": batch / ms * 1e3}

    timed_steps = {}  # variant -> its timed training step, for op_profile_torch

    def time_train_step(name, module):
        x = inputs(shapes.train_batch)
        sigmas = x["sigmas"].view(-1, 1, 1, 1)

        def call():
            noisy = ((1 - sigmas) * x["latents"] + sigmas * x["noise"]).to(torch.bfloat16)
            predicted = module(noisy, x["text"], x["timesteps"], encoder_attention_mask=x["mask"],
                               return_dict=False)[0]
            loss = torch.mean(torch.square(predicted.float() - (x["noise"] - x["latents"]).float()))
            loss.backward()
            return loss

        ms = run.timer(call, sync)
        net.zero_grad(set_to_none=True)
        timed_steps[name] = call
        return {"ms": ms, "images_per_s": shapes.train_batch / ms * 1e3}

    def op_profile_torch(call, calls=3):
        """The profile section's view of a torch call: self time per kernel (device) or op (CPU)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as trace:
            for _ in range(calls):
                call()
            sync(None)
        net.zero_grad(set_to_none=True)
        ops = []
        for event in trace.key_averages():
            us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
            if us > 0:
                ops.append({"op": event.key, "ms": us / 1e3 / calls, "events": event.count / calls})
        ops.sort(key=lambda op: -op["ms"])
        return {"op_ms": sum(op["ms"] for op in ops), "ops": ops[:40]}

    variants = {"eager": net, "compile": torch.compile(net)} if run.torch_compile else {"eager": net}
    for name, module in variants.items():
        for batch in shapes.forward_batches:
            run.budget.require(120 if name == "compile" else 20, f"{name} forward at batch {batch}")
            guarded(out, f"{name}/forward/b{batch}", lambda m=module, b=batch: time_forward(m, b))
        run.budget.require(150 if name == "compile" else 30, f"{name} training step")
        key = f"{name}/train_step/b{shapes.train_batch}"
        guarded(out, key, lambda n=name, m=module: time_train_step(n, m))
        if name in timed_steps:  # where its time goes, as the profile section shows sana-jax's
            guarded(out, f"{key}/ops", lambda n=name: op_profile_torch(timed_steps[n]))


def sweep(out: dict, run: Run) -> None:
    """Launcher times for launch configs one step from the table's, per SANA shape and direction."""
    from sana_jax.kernels import triton_linear_attention as kernels

    reason = triton_unavailable()
    if reason is not None:
        raise Skip(f"Triton unavailable: {reason}")

    shapes = run.shapes

    def time_us(call, args):
        return 1e3 * run.timer(lambda: call(*args), jax.block_until_ready)

    def variants(table):
        one = functools.partial(dataclasses.replace, table)
        return {"table": table, "block32": one(block_n=32), "block128": one(block_n=128),
                "warps2": one(num_warps=2), "warps8": one(num_warps=8), "stages3": one(num_stages=3),
                **{precision: one(precision=precision) for precision in ("ieee", "tf32x3", "tf32")
                   if precision != table.precision},
                "splits1" if table.splits > 1 else "splits2": one(splits=1 if table.splits > 1 else 2)}

    for tokens in shapes.attention_tokens:
        shape = (shapes.attention_batch, tokens, shapes.attention_heads, 32)
        q, k, v, dout = random_arrays(jax.random.key(tokens), shape, jnp.bfloat16)
        table = kernels.launch_config(shape[0] * shape[2], tokens, 32, jnp.bfloat16)
        _, state, key_sum = jax.jit(functools.partial(kernels.forward, eps=EPS, config=table))(q, k, v)
        forward_args, backward_args = (q, k, v), (q, k, v, state, key_sum, dout)
        best = {}
        for name, config in variants(table).items():
            run.budget.require(15, f"sweep {name} at N={tokens}")
            entry = out[f"n{tokens}/{name}"] = {"config": dataclasses.asdict(config)}
            forward = jax.jit(functools.partial(kernels.forward, eps=EPS, config=config))
            backward = jax.jit(functools.partial(kernels.backward, eps=EPS, config=config))
            guarded(entry, "forward_us", lambda f=forward, a=forward_args: time_us(f, a))
            guarded(entry, "backward_us", lambda b=backward, a=backward_args: time_us(b, a))
            for direction in ("forward_us", "backward_us"):
                us = entry[direction]
                if isinstance(us, float) and us < best.get(direction, (math.inf, ""))[0]:
                    best[direction] = (us, name)
        out[f"n{tokens}/best"] = {direction: name for direction, (_, name) in best.items()}


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    """The results as aligned lines: section, name, value."""
    rows = []
    env = results.get("environment", {})
    if "device_kind" in env:
        rows.append(("environment", "device", f"{env['device_kind']} ({env['backend']})"))
        rows.append(("environment", "triton", env.get("triton_unavailable") or "available"))
    copy = results.get("kernels", {}).get("copy_tb_s")
    if copy:
        rows.append(("kernels", "bf16 copy", f"{copy:.2f} TB/s (read + write)"))
    cases = results.get("check", {}).get("cases", {})
    if cases:
        failed = [name for name, c in cases.items() if not c.get("pass")]
        verdict = f"FAILED: {', '.join(failed)}" if failed else "all pass"
        rows.append(("check", f"{len(cases)} cases", verdict))
    for section, unit in (("kernels", "us"), ("model", "ms"), ("diffusers", "ms"), ("sweep", "us")):
        for name, r in results.get(section, {}).items():
            if not isinstance(r, dict) or name == "stopped":
                continue
            if unit in r:
                share = f"  {r['tb_s']:.2f} TB/s, {r['of_copy']:.0%} of the copy" if r.get("of_copy") else ""
                rows.append((section, name, f"{r[unit]:10.2f} {unit}{share}"))
            elif name.endswith("/best"):
                rows.append((section, name, ", ".join(f"{d}: {best}" for d, best in r.items())))
            elif "config" in r:
                times = [f"{d} {r[d]:.1f} us" for d in ("forward_us", "backward_us")
                         if isinstance(r[d], float)]
                rows.append((section, name, ", ".join(times) or "failed"))
            elif "error" in r or "skipped" in r:
                rows.append((section, name, (r.get("error") or r["skipped"]).splitlines()[0][:120]))
    ours = results.get("profile", {})
    profiles = [("profile", f"train_step/b{ours.get('batch')} ({ours.get('attention_impl')} attention)", ours)]
    profiles += [("diffusers", n, r) for n, r in results.get("diffusers", {}).items() if n.endswith("/ops")]
    for section, what, ops in profiles:
        if not ops.get("op_ms"):
            continue
        rows.append((section, what, f"{ops['op_ms']:10.2f} ms of op time per step"))
        for kind, ms in list(ops.get("by_kind", {}).items())[:8]:
            rows.append((section, f"kind {kind}", f"{ms:10.2f} ms  {ms / ops['op_ms']:4.0%}"))
        for op in ops["ops"][:12]:
            rows.append((section, op["op"][:40], f"{op['ms']:10.2f} ms  {op['ms'] / ops['op_ms']:4.0%}  "
                         f"x{op['events']:g}  {op.get('kind', '')}"))
    for section in SECTIONS:
        stopped = results.get(section, {}).get("stopped")
        if stopped:
            why = stopped.get("error") or stopped["skipped"]
            rows.append((section, "stopped", why.splitlines()[0][:120]))
    width = max((len(f"{s}  {n}") for s, n, _ in rows), default=0)
    return "\n".join(f"{f'{s}  {n}':<{width}}  {value}" for s, n, value in rows)


SECTION_FUNCTIONS = {"environment": environment, "check": check, "kernels": attention, "model": model,
                     "profile": profile, "diffusers": diffusers_model, "sweep": sweep}


def flag_values() -> flags.FlagValues:
    """The command line's flags, on their own `FlagValues`."""
    values = flags.FlagValues()
    define = {"flag_values": values}
    flags.DEFINE_string("out", None, "JSON path (default: $OUT/bench_gpu.json, else ./bench_gpu.json)", **define)
    flags.DEFINE_float("budget-s", 540.0, "wall-clock seconds for the run; measurements that would overrun are "
                       "skipped", **define)
    flags.DEFINE_list("sections", list(SECTIONS), f"comma-separated subset of {SECTIONS}, run in the "
                       "order given", **define)
    flags.DEFINE_integer("repeats", None, "timed samples per measurement (default 10, each the mean of 5 calls)",
                         **define)
    flags.DEFINE_integer("seed", None, "seed of the check inputs (default: from the clock)", **define)
    flags.DEFINE_boolean("no-compile", False, "skip torch.compile in the diffusers section", **define)
    flags.DEFINE_boolean("dry-run", False, "tiny shapes, the 'tiny' preset, no torch.compile: checks the harness "
                         "(CPU too)", **define)
    return values


def parse_args(argv: Sequence[str] | None = None) -> SimpleNamespace:
    """The settings of a command line (`argv` without the program name; None: `sys.argv[1:]`), with the section
    a child runs (`SECTION_VARIABLE`, None in the parent); a mistake ends the command with one line (status 2)."""
    values = flag_values()
    cli.parse(values, argv, __doc__)
    args = SimpleNamespace(**{name.replace("-", "_"): value for name, value in values.flag_values_dict().items()})
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        cli.fail(f"--sections: unknown {unknown}; expected a subset of {SECTIONS}")
    args.one_section = os.environ.get(SECTION_VARIABLE)
    if args.one_section not in (None, *SECTIONS):
        cli.fail(f"{SECTION_VARIABLE}={args.one_section!r}: expected one of {SECTIONS}")
    return args


def run_one_section(args: SimpleNamespace) -> None:
    """The child: runs section args.one_section and writes its results to args.out."""
    if args.dry_run:
        timer = functools.partial(median_ms, repeats=args.repeats or 1, inner=1, warmup=1)
    else:
        timer = functools.partial(median_ms, repeats=args.repeats or 10, inner=5, warmup=2)
    run = Run(shapes=TINY if args.dry_run else FULL, budget=Budget(args.budget_s), timer=timer,
              seed=args.seed, torch_compile=not (args.no_compile or args.dry_run))
    out: dict[str, Any] = {}
    guarded(out, "stopped", lambda: SECTION_FUNCTIONS[args.one_section](out, run))
    if out["stopped"] is None:  # ran to the end
        del out["stopped"]
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)


def run_in_child(section: str, args: SimpleNamespace, seconds: float, scratch: str) -> dict:
    """Runs one section in a fresh process with `seconds` of budget; its results, or why there are none."""
    path = os.path.join(scratch, f"{section}.json")
    command = [sys.executable, os.path.abspath(__file__), "--out", path, "--budget-s", f"{seconds:.0f}",
               "--seed", str(args.seed)]
    command += ["--repeats", str(args.repeats)] if args.repeats else []
    command += [flag for flag, on in (("--dry-run", args.dry_run), ("--no-compile", args.no_compile)) if on]
    try:
        # Past its budget a section only finishes the measurement in hand; allow a compile's worth.
        code = subprocess.run(command, timeout=seconds + 240,
                              env={**os.environ, SECTION_VARIABLE: section}).returncode
    except subprocess.TimeoutExpired:
        return {"stopped": {"error": f"killed after {seconds + 240:.0f} s"}}
    if not os.path.exists(path):
        return {"stopped": {"error": f"the section's process exited with code {code} and no results"}}
    with open(path) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark the command line `argv` (None: `sys.argv[1:]`) asks for; returns its results."""
    args = parse_args(argv)
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        if not os.environ.get(name):
            os.environ[name] = tempfile.mkdtemp(prefix=f"{name.lower()}_")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch
    if args.one_section:
        run_one_section(args)
        return {}
    if args.seed is None:
        args.seed = time.time_ns() % 2**31
    path = args.out or os.path.join(os.environ.get("OUT", "."), "bench_gpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget_s, "seed": args.seed}
    with tempfile.TemporaryDirectory() as scratch:
        for section in args.sections:
            print(f"[bench_gpu] {section}: {budget.left():.0f} s of the budget left", flush=True)
            start = time.monotonic()
            if budget.left() < 10:
                results[section] = {"stopped": {"skipped": f"{budget.left():.0f} s of the budget left"}}
            else:
                results[section] = run_in_child(section, args, budget.left(), scratch)
            results[section]["wall_s"] = time.monotonic() - start
            with open(path, "w") as f:
                json.dump(results, f, indent=2, default=str)
    print(table(results))
    print(f"[bench_gpu] wrote {path}")
    return results


if __name__ == "__main__":
    main()
