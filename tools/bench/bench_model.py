"""Times the SANA forward and forward+backward on the current backend.

Prints ms per call, images/s, achieved TFLOP/s (XLA's own FLOP count of the compiled step) and the scratch
memory XLA allocates per call (on CPU with glibc's malloc, mapped and zeroed afresh at every call:
docs/performance.md), and the malloc in use, for a preset and batch; with --diffusers, also times diffusers'
`SanaTransformer2DModel` (eager, and torch.compile with --torch_compile) on the same configuration in the same
run, the calls alternating round by round, and sana-jax's speed relative to each diffusers variant per round.
With --profile=N, also where each sana-jax program's time goes: op time summed by kind of HLO instruction, and
its N costliest instructions (`sana_jax.benchmarking.op_profile`). With --products, also each program's matrix
products alone (`sana_jax.benchmarking.products_program`; with --diffusers, the same products with torch.bmm):
the time no implementation of the model can go below at this machine's matrix-product speed, and so the most
sana-jax could gain on diffusers if everything else took no time.

  python tools/bench/bench_model.py --preset=small --batch=8 --latent=16 --text_len=32 --diffusers
  python tools/bench/bench_model.py --config=configs/pretrain.py --diffusers      # the main job's model and batch
  python tools/bench/bench_model.py --preset=small --profile=20
  python tools/bench/bench_model.py --preset=small --diffusers --products
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sana_jax import cli
from sana_jax.benchmarking import (
    MatrixProduct,
    OpTime,
    interleaved_ms,
    matrix_products,
    op_profile,
    op_time_by_kind,
    products_program,
)
from sana_jax.data.pipeline import DataConfig, element_shapes
from sana_jax.model import forward, init_params, preset
from sana_jax.model.config import COMPUTE_DTYPES, REMAT_POLICIES
from sana_jax.trainer.loop import model_config_for


def compiled_costs(compiled: jax.stages.Compiled) -> tuple[float | None, int | None]:
    """(XLA's FLOP count, bytes of scratch memory per call) of a compiled program; None where not reported."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    memory = compiled.memory_analysis()
    return (float(cost["flops"]) if cost and "flops" in cost else None,
            memory.temp_size_in_bytes if memory is not None else None)


def jax_programs(config, batch: int, latent: int, text_len: int) -> dict[str, tuple]:
    """"forward" / "forward+backward" -> (function, arguments) of sana-jax's two programs on random inputs."""
    key = jax.random.key(0)
    params = init_params(config, key)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((batch, latent, latent, config.in_channels)), jnp.float32)
    timesteps = jnp.asarray(rng.integers(0, 1000, batch), jnp.float32)
    text = jnp.asarray(rng.standard_normal((batch, text_len, config.caption_channels)), jnp.float32)
    mask = jnp.ones((batch, text_len), jnp.int32)
    args = (params, latents, timesteps, text, mask)

    def fwd(p, x, t, y, m):
        return forward(p, config, x, t, y, m)

    def loss(p, x, t, y, m):
        return jnp.mean(jnp.square(fwd(p, x, t, y, m) - x))

    return {"forward": (fwd, args), "forward+backward": (jax.value_and_grad(loss), args)}


def jax_calls(programs: dict[str, tuple]) -> dict[str, tuple]:
    """name -> (call, sync, XLA's FLOP count, scratch bytes) of each program, compiled once."""
    calls = {}
    for name, (fn, args) in programs.items():
        compiled = jax.jit(fn).lower(*args).compile()
        calls[f"{name} (sana-jax)"] = (functools.partial(compiled, *args), jax.block_until_ready,
                                       *compiled_costs(compiled))
    return calls


def products_calls(programs: dict[str, tuple], torch_too: bool) -> dict[str, tuple]:
    """name -> (call, sync, FLOPs, None) of each program's matrix products alone: XLA's, and torch.bmm's on
    operands laid out for it beforehand (batch, rows, depth) x (batch, depth, columns)."""
    calls = {}
    for name, (fn, args) in programs.items():
        found = matrix_products(fn, *args)
        flops = sum(p.flops for p in found)
        calls[f"{name}: products alone (sana-jax)"] = (products_program(found), jax.block_until_ready, flops, None)
        if torch_too:
            calls[f"{name}: products alone (torch)"] = (torch_products(found), lambda _: None, flops, None)
    return calls


def torch_products(products: list[MatrixProduct]):
    """A call computing `products` with torch.bmm, on the device diffusers runs on."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = []
    for p in products:
        (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = p.dimension_numbers
        batch = int(np.prod([p.lhs.shape[i] for i in lhs_batch]))
        depth = int(np.prod([p.lhs.shape[i] for i in lhs_contracting]))
        lhs_free = [i for i in range(len(p.lhs.shape)) if i not in (*lhs_contracting, *lhs_batch)]
        rhs_free = [i for i in range(len(p.rhs.shape)) if i not in (*rhs_contracting, *rhs_batch)]
        dtype = getattr(torch, np.dtype(p.lhs.dtype).name)
        lhs = torch.randn(p.lhs.shape, dtype=dtype).permute(*lhs_batch, *lhs_free, *lhs_contracting)
        rhs = torch.randn(p.rhs.shape, dtype=dtype).permute(*rhs_batch, *rhs_contracting, *rhs_free)
        pairs.append((lhs.reshape(batch, -1, depth).contiguous().to(device),
                      rhs.reshape(batch, depth, -1).contiguous().to(device)))

    def run():
        with torch.no_grad():
            out = [torch.bmm(lhs, rhs) for lhs, rhs in pairs]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def diffusers_calls(config, batch: int, latent: int, text_len: int, compile_: bool) -> dict[str, tuple]:
    """name -> (call, sync, None, None) of diffusers' forward and forward+backward, eager (and torch.compile)."""
    import torch
    from diffusers import SanaTransformer2DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if config.compute_dtype == "bfloat16" else torch.float32
    model = SanaTransformer2DModel(
        in_channels=config.in_channels, out_channels=config.out_channels, num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, num_layers=config.depth, num_cross_attention_heads=config.cross_num_heads,
        cross_attention_head_dim=config.cross_head_dim, cross_attention_dim=config.hidden,
        caption_channels=config.caption_channels, sample_size=latent, patch_size=config.patch_size,
        qk_norm=config.qk_norm, mlp_ratio=config.mlp_ratio).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, config.in_channels, latent, latent, generator=gen).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    text = torch.randn(batch, text_len, config.caption_channels, generator=gen).to(device, dtype)
    mask = torch.ones(batch, text_len, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    calls = {}
    variants = [("eager", model)]
    if compile_:
        variants.append(("torch.compile", torch.compile(model)))
    for label, net in variants:
        def fwd(net=net):
            with torch.no_grad():
                return net(latents, text, timesteps, encoder_attention_mask=mask).sample

        def fwd_bwd(net=net):
            net.zero_grad(set_to_none=True)
            out = net(latents, text, timesteps, encoder_attention_mask=mask).sample
            torch.mean(torch.square(out - latents)).backward()

        for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
            calls[f"{name} (diffusers {label})"] = (fn, lambda _: sync(), None, None)
    return calls


_PRESET = flags.DEFINE_string("preset", "small", "model preset (ignored with --config)")
_CONFIG = config_flags.DEFINE_config_file("config", None, "a training config: its model, batch and data shapes")
_BATCH = flags.DEFINE_integer("batch", 8, "batch size (ignored with --config)")
_LATENT = flags.DEFINE_integer("latent", 16, "latent height = width (ignored with --config)")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "caption tokens (ignored with --config)")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", COMPUTE_DTYPES, "compute dtype")
_REMAT = flags.DEFINE_enum("remat", "none", REMAT_POLICIES, "rematerialisation policy")
_UNROLL = flags.DEFINE_bool("unroll_blocks", None, "an unrolled loop over blocks instead of a scan "
                            "(default: the preset's or the config's)")
_BATCH_SPLITS = flags.DEFINE_integer("batch_splits", None, "the batch as this many independent parts "
                                     "(default: the preset's or the config's)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds; each times every call in turn, so that a host whose speed "
                               "drifts slows all of them alike")
_DIFFUSERS = flags.DEFINE_bool("diffusers", False, "also time diffusers on the same config")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "with --diffusers, add torch.compile")
_JSON = flags.DEFINE_string("json", None, "write the results here")
_PRODUCTS = flags.DEFINE_bool("products", False, "also time each program's matrix products alone, and print the "
                               "most sana-jax could gain on diffusers if everything else took no time")
_PROFILE = flags.DEFINE_integer("profile", 0, "print this many of each sana-jax program's costliest HLO "
                                "instructions (a jax.profiler trace of 3 calls), with op time by kind", lower_bound=0)


def benchmark_setup() -> tuple:
    """(model config, batch, latent side, text length) from --config or the preset flags."""
    if _CONFIG.value is not None:
        config = _CONFIG.value
        data_config = DataConfig.from_mapping(config.data)
        model = model_config_for(config, data_config)
        shapes = element_shapes(data_config)
        setup = (model, config.batch_size, shapes["latents"][0], shapes["text"][0])
    else:
        setup = (preset(_PRESET.value), _BATCH.value, _LATENT.value, _TEXT_LEN.value)
    model = dataclasses.replace(setup[0], compute_dtype=_COMPUTE_DTYPE.value, remat=_REMAT.value)
    if _UNROLL.value is not None:
        model = dataclasses.replace(model, unroll_blocks=_UNROLL.value)
    if _BATCH_SPLITS.value is not None:
        model = dataclasses.replace(model, batch_splits=_BATCH_SPLITS.value)
    return (model, *setup[1:])


def print_op_profile(name: str, ops: list[OpTime], top: int) -> None:
    """Op time by kind of instruction, then the `top` costliest instructions, of one profiled program."""
    total = sum(op.ms for op in ops)
    print(f"\n{name}: {total:.1f} ms of op time per call (traced; on a CPU, threads overlap)")
    for kind, ms in op_time_by_kind(ops).items():
        if ms >= 0.005 * total:
            print(f"  {ms:9.2f} ms {ms / total:5.1%}  {kind}")
    print(f"  {'ms':>9}    share  events  instruction (kind)")
    for op in ops[:top]:
        print(f"  {op.ms:9.2f} ms {op.ms / total:5.1%}  {op.events:6g}  {op.op} ({op.kind})")


def main(argv: list[str]) -> None:
    del argv
    config, batch, latent, text_len = benchmark_setup()
    programs = jax_programs(config, batch, latent, text_len)
    calls = jax_calls(programs)
    if _DIFFUSERS.value:
        calls.update(diffusers_calls(config, batch, latent, text_len, _TORCH_COMPILE.value))
    if _PRODUCTS.value:
        calls.update(products_calls(programs, torch_too=_DIFFUSERS.value))
    samples = interleaved_ms({name: (fn, sync) for name, (fn, sync, _, _) in calls.items()},
                             rounds=_ROUNDS.value, repeats=_REPEATS.value)
    rows = {}
    for name, (_, _, flops, scratch) in calls.items():
        ms = float(np.median(samples[name]))
        rows[name] = {"ms": ms, "ms_per_round": samples[name], "images_per_s": batch / ms * 1e3,
                      "tflops": flops / ms * 1e-9 if flops else None,
                      "scratch_mib": scratch / 2**20 if scratch is not None else None}
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"model=D{config.hidden}x{config.depth} ({'unrolled' if config.blocks_unrolled() else 'scanned'} blocks, "
          f"{config.batch_splits} batch part(s)) "
          f"batch={batch} latent={latent}x{latent} text_len={text_len} dtype={config.compute_dtype} "
          f"rounds={_ROUNDS.value} x {_REPEATS.value} calls malloc={cli.malloc_in_use()}")
    print(f"{'what':<44} {'ms':>10} {'images/s':>10} {'TFLOP/s':>9} {'scratch MiB':>12}")
    for name, row in rows.items():
        tflops = f"{row['tflops']:.3f}" if row["tflops"] else "-"
        scratch = f"{row['scratch_mib']:.0f}" if row["scratch_mib"] is not None else "-"
        print(f"{name:<44} {row['ms']:>10.1f} {row['images_per_s']:>10.1f} {tflops:>9} {scratch:>12}")
    for name in rows:  # sana-jax's speed relative to each diffusers variant, round by round
        if "(diffusers" in name:
            ours = np.asarray(samples[name.split(" (")[0] + " (sana-jax)"])
            ratios = np.asarray(samples[name]) / ours
            print(f"speed of sana-jax / {name}: median {np.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
            floor = name.split(" (")[0] + ": products alone (sana-jax)"
            if floor in samples:
                ceilings = np.asarray(samples[name]) / np.asarray(samples[floor])
                print(f"  at most, with everything but the matrix products free: median {np.median(ceilings):.2f}x "
                      f"(rounds: {', '.join(f'{r:.2f}' for r in ceilings)})")
    if _PROFILE.value:
        for program in programs:
            name = f"{program} (sana-jax)"
            call = calls[name][0]
            print_op_profile(name, op_profile(call.func, *call.args), _PROFILE.value)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"model": dataclasses.asdict(config), "batch": batch, "latent": latent,
                       "text_len": text_len, "results": rows}, f, indent=2)


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    app.run(main)
