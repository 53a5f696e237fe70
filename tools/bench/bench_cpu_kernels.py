"""Times the C++ CPU kernels against the XLA forms they replace, alone and in the model.

Kernels, forward and forward+backward (a vjp), on the `small` preset's shapes by default: the linear attention
(native; XLA with the closed-form backward; XLA with autodiff, the model's "xla" path), the cross-attention
(native; XLA) and the Mix-FFN's gated depthwise convolution (native; XLA's bias, SiLU and gate around the native
convolution; the shifted form). With --model, also the model's forward and forward+backward with
attention_impl="xla" against "auto" (the attention kernels). All calls alternate round by round, so that a host
whose speed drifts slows them alike; each row prints the median and the rounds' range in ms.

  python tools/bench/bench_cpu_kernels.py
  python tools/bench/bench_cpu_kernels.py --model --rounds=8 --repeats=3
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sana_jax.benchmarking import interleaved_ms
from sana_jax.kernels import (
    cross_attention,
    depthwise_conv3x3,
    gated_depthwise_conv3x3,
    linear_attention,
    linear_attention_xla,
)
from sana_jax.model import forward, init_params, preset

_BATCH = flags.DEFINE_integer("batch", 8, "images")
_LATENT = flags.DEFINE_integer("latent", 16, "latent height = width (tokens = latent^2)")
_HEADS = flags.DEFINE_integer("heads", 8, "attention heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "attention head dim")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "caption tokens")
_CHANNELS = flags.DEFINE_integer("channels", 640, "the gated convolution's output channels (input: twice that)")
_MODEL = flags.DEFINE_bool("model", False, "also time the `small` model with attention_impl 'xla' against 'auto'")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "rounds")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls per round")


def _value_and_vjp(fn: Callable, *args: jax.Array) -> Callable:
    """A jitted call of fn(*args) and its vjp against a fixed random cotangent."""
    out = jax.eval_shape(fn, *args)
    cotangent = jax.random.normal(jax.random.key(1), out.shape, out.dtype)

    def both(*a):
        value, vjp = jax.vjp(fn, *a)
        return value, vjp(cotangent)

    return jax.jit(both)


def _compiled_call(fn: Callable, args: tuple) -> Callable[[], object]:
    """fn compiled for args, as a call without arguments."""
    compiled = fn.lower(*args).compile()
    return lambda: compiled(*args)


def _composed_gated(u, shift, kernel, bias):
    values, gates = jnp.split(depthwise_conv3x3(jax.nn.silu(u + shift), kernel, bias, impl="native"), 2, axis=-1)
    return values * jax.nn.silu(gates)


def kernel_calls() -> dict[str, Callable[[], object]]:
    """name -> a call of each kernel form, forward and forward+backward, compiled."""
    keys = iter(jax.random.split(jax.random.key(0), 16))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    batch, tokens = _BATCH.value, _LATENT.value ** 2
    heads, d, channels = _HEADS.value, _HEAD_DIM.value, _CHANNELS.value
    q, k, v = (normal(batch, tokens, heads, d) for _ in range(3))
    text_k, text_v = (normal(batch, _TEXT_LEN.value, heads, d) for _ in range(2))
    bias = jnp.zeros((batch, _TEXT_LEN.value), jnp.float32)
    gated = (normal(batch, _LATENT.value, _LATENT.value, 2 * channels), normal(2 * channels),
             normal(3, 3, 2 * channels), normal(2 * channels))
    forms = {
        "linear attention, C++": (lambda *a: linear_attention(*a, impl="native"), (q, k, v)),
        "linear attention, XLA closed-form backward": (lambda *a: linear_attention(*a, impl="xla"), (q, k, v)),
        "linear attention, XLA autodiff": (linear_attention_xla, (q, k, v)),
        "cross-attention, C++": (lambda *a: cross_attention(*a, impl="native"), (q, text_k, text_v, bias)),
        "cross-attention, XLA autodiff": (lambda *a: cross_attention(*a, impl="xla"), (q, text_k, text_v, bias)),
        "gated conv, C++": (lambda *a: gated_depthwise_conv3x3(*a, impl="native"), gated),
        "gated conv, XLA around the C++ conv": (_composed_gated, gated),
        "gated conv, shifted": (lambda *a: gated_depthwise_conv3x3(*a, impl="shifted"), gated),
    }
    calls = {}
    for name, (fn, args) in forms.items():
        calls[f"{name}: forward"] = _compiled_call(jax.jit(fn), args)
        calls[f"{name}: forward+backward"] = _compiled_call(_value_and_vjp(fn, *args), args)
    return calls


def model_calls() -> dict[str, Callable[[], object]]:
    """The `small` model's forward and forward+backward with attention_impl 'xla' and 'auto', compiled."""
    base = preset("small")
    params = init_params(base, jax.random.key(0))
    keys = jax.random.split(jax.random.key(2), 3)
    latents = jax.random.normal(keys[0], (_BATCH.value, _LATENT.value, _LATENT.value, base.in_channels))
    timesteps = jax.random.uniform(keys[1], (_BATCH.value,), maxval=1000.0)
    text = jax.random.normal(keys[2], (_BATCH.value, _TEXT_LEN.value, base.caption_channels))
    mask = jnp.ones((_BATCH.value, _TEXT_LEN.value), jnp.int32)
    calls = {}
    for impl in ("xla", "auto"):
        config = dataclasses.replace(base, attention_impl=impl)
        run = lambda p, config=config: forward(p, config, latents, timesteps, text, mask)  # noqa: E731
        loss = lambda p, run=run: jnp.mean(jnp.square(run(p) - latents))  # noqa: E731
        calls[f"model, attention_impl={impl}: forward"] = _compiled_call(jax.jit(run), (params,))
        calls[f"model, attention_impl={impl}: forward+backward"] = _compiled_call(
            jax.jit(jax.value_and_grad(loss)), (params,))
    return calls


def main(argv: list[str]) -> None:
    del argv
    calls = kernel_calls()
    if _MODEL.value:
        calls.update(model_calls())
    samples = interleaved_ms({name: (fn, jax.block_until_ready) for name, fn in calls.items()},
                             rounds=_ROUNDS.value, repeats=_REPEATS.value)
    print(f"backend={jax.default_backend()} batch={_BATCH.value} tokens={_LATENT.value ** 2} heads={_HEADS.value} "
          f"head_dim={_HEAD_DIM.value} text_len={_TEXT_LEN.value} channels={_CHANNELS.value} "
          f"rounds={_ROUNDS.value} x {_REPEATS.value} calls")
    print(f"{'what':<62} {'median ms':>10} {'rounds':>17}")
    for name, ms in samples.items():
        print(f"{name:<62} {np.median(ms):>10.3f} {min(ms):>8.3f}-{max(ms):<8.3f}")
    if _MODEL.value:
        for program in ("forward", "forward+backward"):
            ratios = (np.asarray(samples[f"model, attention_impl=xla: {program}"])
                      / np.asarray(samples[f"model, attention_impl=auto: {program}"]))
            print(f"model {program}, 'auto' over 'xla': median {np.median(ratios):.3f}x "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    app.run(main)
