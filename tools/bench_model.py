"""Times the SANA forward and forward+backward on the current backend.

Prints ms per call, images/s and achieved TFLOP/s (XLA's own FLOP count of the compiled step) for a preset and
batch; with --diffusers, also times diffusers' `SanaTransformer2DModel` (eager, and torch.compile with
--torch_compile) on the same configuration in the same run.

  python tools/bench_model.py --preset=small --batch=8 --latent=16 --text_len=32 --diffusers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.model import forward, init_params, preset


def time_call(fn, *args, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn(*args) in ms; blocks on every output."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def compiled_flops(jitted, *args) -> float | None:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_jax(config, batch: int, latent: int, text_len: int, repeats: int) -> dict:
    key = jax.random.key(0)
    params = init_params(config, key)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((batch, latent, latent, config.in_channels)), jnp.float32)
    timesteps = jnp.asarray(rng.integers(0, 1000, batch), jnp.float32)
    text = jnp.asarray(rng.standard_normal((batch, text_len, config.caption_channels)), jnp.float32)
    mask = jnp.ones((batch, text_len), jnp.int32)

    fwd = jax.jit(forward, static_argnums=1)

    def loss(p, x, t, y, m):
        return jnp.mean(jnp.square(forward(p, config, x, t, y, m) - x))

    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    results = {}
    for name, fn, args in (("forward", fwd, (params, config, latents, timesteps, text, mask)),
                           ("forward+backward", fwd_bwd, (params, latents, timesteps, text, mask))):
        ms = time_call(fn, *args, repeats=repeats)
        flops = compiled_flops(fn, *args)
        results[name] = {"ms": ms, "images_per_s": batch / ms * 1e3,
                         "tflops": flops / ms * 1e-9 if flops else None}
    return results


def bench_diffusers(config, batch: int, latent: int, text_len: int, repeats: int, compile_: bool) -> dict:
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

    def timed(fn) -> float:
        for _ in range(2):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    results = {}
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
            ms = timed(fn)
            results[f"{name} ({label})"] = {"ms": ms, "images_per_s": batch / ms * 1e3, "tflops": None}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--text_len", type=int, default=32)
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--unroll_blocks", action="store_true", help="an unrolled loop over blocks instead of a scan")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers on the same config")
    parser.add_argument("--torch_compile", action="store_true", help="with --diffusers, add torch.compile")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    config = dataclasses.replace(preset(args.preset), compute_dtype=args.compute_dtype, remat=args.remat,
                                 unroll_blocks=args.unroll_blocks)
    rows = {f"{k} (sana-jax)": v for k, v in
            bench_jax(config, args.batch, args.latent, args.text_len, args.repeats).items()}
    if args.diffusers:
        rows.update({f"{k} (diffusers)" if "(" not in k else k.replace("(", "(diffusers ", 1): v for k, v in
                     bench_diffusers(config, args.batch, args.latent, args.text_len, args.repeats,
                                     args.torch_compile).items()})
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} preset={args.preset} "
          f"batch={args.batch} latent={args.latent}x{args.latent} text_len={args.text_len} "
          f"dtype={args.compute_dtype}")
    print(f"{'what':<44} {'ms':>10} {'images/s':>10} {'TFLOP/s':>9}")
    for name, row in rows.items():
        tflops = f"{row['tflops']:.3f}" if row["tflops"] else "-"
        print(f"{name:<44} {row['ms']:>10.1f} {row['images_per_s']:>10.1f} {tflops:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
