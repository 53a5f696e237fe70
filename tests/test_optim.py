"""CAME / CAME-8bit against came-pytorch, a NumPy re-derivation, the float32 optimizer and one device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from came_pytorch import CAME

from sana_jax.optim import (
    SANA_SCHEME,
    Factoring,
    Quantized,
    came,
    came_pytorch_factoring,
    sana_factoring,
    state_bytes,
)

STEPS = 20


def _random_grads(rng, shapes, steps=STEPS):
    """Gradients whose scale varies over steps (1e-3 .. 10), with some all-zero rows."""
    grads = []
    for _ in range(steps):
        step = {}
        for name, shape in shapes.items():
            g = rng.standard_normal(shape) * 10 ** rng.uniform(-3, 1)
            if len(shape) >= 2:
                g[..., 0, :] = 0.0
            step[name] = g.astype(np.float32)
        grads.append(step)
    return grads


def _run(tx, params, grads):
    """Params after applying `grads` in turn, and the final state."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("weight_decay, schedule", [(0.0, False), (0.1, True)],
                         ids=["plain", "decay+schedule"])
def test_matches_came_pytorch(weight_decay, schedule):
    rng = np.random.default_rng(0)
    shapes = {"kernel": (24, 40), "bias": (40,), "table": (6, 40)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = _random_grads(rng, shapes)
    lr = optax.linear_schedule(1e-2, 2e-3, STEPS) if schedule else 1e-2

    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    reference = CAME(list(torch_params.values()), lr=1e-2, weight_decay=weight_decay)
    for step, g in enumerate(grads):
        reference.param_groups[0]["lr"] = float(lr(step)) if schedule else lr
        for name, p in torch_params.items():
            p.grad = torch.tensor(g[name])
        reference.step()

    tx = came(lr, weight_decay=weight_decay, factoring=came_pytorch_factoring)
    ours, _ = _run(tx, jax.tree.map(jnp.asarray, params), grads)
    for name, p in torch_params.items():
        expected = p.detach().numpy()
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        moved = expected - params[name]
        # The displacement itself, up to float32 rounding of the parameter values.
        assert np.abs(np.asarray(ours[name]) - expected).max() <= 1e-4 * np.abs(moved).max(), name


def _numpy_came(p, grads, factored, lr, weight_decay, b=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip=1.0):
    """CAME on one tensor in float64, written out from the algorithm (Luo et al. 2023, CAME, Algorithm 1).

    A factored tensor is one (rows, cols) matrix; the others keep full moments and step with m.
    """
    p, m = p.astype(np.float64), np.zeros(p.shape)
    v, r_row, r_col, s_row, s_col = np.zeros(p.shape), 0.0, 0.0, 0.0, 0.0
    approx = lambda row, col: np.outer(row / row.mean(), col) ** -0.5
    for g in grads:
        g = g.astype(np.float64)
        if factored:
            r_row = b[1] * r_row + (1 - b[1]) * (g * g + eps[0]).mean(axis=1)
            r_col = b[1] * r_col + (1 - b[1]) * (g * g + eps[0]).mean(axis=0)
            u = g * approx(r_row, r_col)
        else:
            v = b[1] * v + (1 - b[1]) * (g * g + eps[0])
            u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
        m = b[0] * m + (1 - b[0]) * u
        if factored:
            res = (u - m) ** 2 + eps[1]
            s_row = b[2] * s_row + (1 - b[2]) * res.mean(axis=1)
            s_col = b[2] * s_col + (1 - b[2]) * res.mean(axis=0)
            step = m * approx(s_row, s_col)
        else:
            step = m
        p = p - lr * (step + weight_decay * p)
    return p


def test_sana_rule_stacked_and_depthwise():
    """Stacked (L, ...) leaves step every layer like the unstacked tensor; depthwise kernels and vectors are
    not factored, 1x1 convs and (6, D) tables are."""
    shapes = {"blocks": {"kernel": (3, 8, 12), "table": (3, 6, 12), "depthwise": (3, 3, 3, 10),
                         "bias": (3, 12)},
              "patch": (1, 1, 4, 12), "depthwise": (3, 3, 10), "vector": (12,)}
    expected_rule = {"blocks": {"kernel": Factoring(1, (1, 2)), "table": Factoring(1, (1, 2)),
                                "depthwise": Factoring(1, None), "bias": Factoring(1, None)},
                     "patch": Factoring(0, (2, 3)), "depthwise": Factoring(0, None),
                     "vector": Factoring(0, None)}
    rule = jax.tree_util.tree_map_with_path(lambda path, s: sana_factoring(path, s), shapes,
                                            is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], int))
    assert rule == expected_rule

    rng = np.random.default_rng(1)
    flat = {"/".join(str(k.key) for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], int))}
    grads = _random_grads(rng, flat)
    for g in grads:  # layers of very different gradient scales
        for name in flat:
            if name.startswith("blocks/"):
                g[name] *= np.array([1e-3, 1.0, 30.0], np.float32).reshape(3, *[1] * (g[name].ndim - 1))
    nest = lambda d: {"blocks": {k[7:]: v for k, v in d.items() if k.startswith("blocks/")},
                      **{k: v for k, v in d.items() if not k.startswith("blocks/")}}
    params = {name: rng.standard_normal(s).astype(np.float32) for name, s in flat.items()}
    lr, weight_decay = 1e-2, 0.1
    tx = came(lr, weight_decay=weight_decay)
    ours, _ = _run(tx, jax.tree.map(jnp.asarray, nest(params)), [nest(g) for g in grads])
    ours = {name: np.asarray(ours["blocks"][name[7:]] if name.startswith("blocks/") else ours[name])
            for name in flat}

    factored = {"blocks/kernel", "blocks/table", "patch"}
    for name, shape in flat.items():
        layers = range(shape[0]) if name.startswith("blocks/") else [None]
        for layer in layers:
            pick = (lambda x, layer=layer: x[layer]) if layer is not None else (lambda x: x)
            matrix_shape = (4, 12) if name == "patch" else pick(params[name]).shape
            reference = _numpy_came(pick(params[name]).reshape(matrix_shape),
                                    [pick(g[name]).reshape(matrix_shape) for g in grads],
                                    name in factored, lr, weight_decay)
            np.testing.assert_allclose(pick(ours[name]).reshape(matrix_shape), reference, rtol=2e-5,
                                       atol=1e-6, err_msg=f"{name}, layer {layer}")
            if layer is not None:  # the same layer as a parameter of its own
                alone, _ = _run(tx, {"w": jnp.asarray(params[name][layer])},
                                [{"w": g[name][layer]} for g in grads])
                np.testing.assert_allclose(alone["w"], ours[name][layer], rtol=1e-6, atol=1e-7)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


@pytest.fixture(scope="module")
def regression():
    """A teacher-student MLP regression and the float32 CAME run on it."""
    keys = jax.random.split(jax.random.key(0), 6)
    init = lambda k1, k2: {"w1": jax.random.normal(k1, (128, 256)) / 11, "b1": jnp.zeros(256),
                           "w2": jax.random.normal(k2, (256, 128)) / 16}
    x = jax.random.normal(keys[2], (1024, 128))
    y = _mlp(init(keys[0], keys[1]), x) + 0.01 * jax.random.normal(keys[3], (1024, 128))
    loss = lambda p: jnp.mean((_mlp(p, x) - y) ** 2)
    params = init(keys[4], keys[5])

    def train(tx, steps=200):
        def step(carry, _):
            p, state = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        (_, state), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, steps))(params)
        return np.asarray(losses), state

    return train, train(came(1e-3))


@pytest.mark.parametrize("scheme", [None, SANA_SCHEME], ids=["default", "sana"])
def test_eight_bit_tracks_float32(regression, scheme):
    train, (reference, reference_state) = regression
    tx = came(1e-3, eight_bit=True) if scheme is None else came(1e-3, eight_bit=True, scheme=scheme)
    losses, state = train(tx)
    final, reference_final = losses[-20:].mean(), reference[-20:].mean()
    assert reference_final < 0.2 * reference[0]
    assert abs(final / reference_final - 1) < 0.03, (final, reference_final)
    mu = state[0].mu
    assert isinstance(mu["w1"], Quantized) and isinstance(mu["w2"], Quantized)  # 32768 > 16384 elements
    assert mu["w1"].codes.dtype.itemsize == 1 and mu["b1"].dtype == jnp.float32
    assert state_bytes(state) < 0.5 * state_bytes(reference_state)


class _SanaCame8bit:
    """SANA's `CAME8BitWrapper` step (NVlabs/Sana, diffusion/utils/optimizer.py), ported to torch float32 on
    PyTorch-layout weights: (out, in) linears and (out, in, 1, 1) convs are factored over (out, in); others
    keep a full second moment and step with m. Only m of factored weights with out * in > 16384 is stored in
    8 bits: per chunk of 2048 rows (`split(2048)` along out), scale = (max - min) / 255 and
    code = round((m - min) / scale) as uint8, decoded as code * scale + min. The step and the instability use
    this step's float32 m; the decoded m enters the next step."""

    def __init__(self, lr, weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip=1.0):
        self.lr, self.weight_decay, self.betas, self.eps, self.clip = lr, weight_decay, betas, eps, clip
        self.state = {}
        self.largest_step = {}  # per tensor: the largest |lr * update| entry of any step

    @staticmethod
    def encode(m):
        chunks = []
        for chunk in m.split(2048):
            low, scale = chunk.min(), (chunk.max() - chunk.min()) / 255
            # A constant chunk has scale 0 and decodes to its min whatever the codes (SANA's codes are NaN there).
            codes = ((chunk - low) / scale).round() if scale > 0 else torch.zeros_like(chunk)
            chunks.append((codes.to(torch.uint8), scale, low))
        return chunks

    @staticmethod
    def decode(chunks):
        return torch.cat([codes.float() * scale + low for codes, scale, low in chunks])

    @staticmethod
    def rsqrt_outer(row, col):
        return (row / row.mean()).rsqrt()[:, None] * col.rsqrt()[None, :]

    def step(self, p, g):
        """One update of the tensor p (in place) with gradient g."""
        b1, b2, b3 = self.betas
        factored = p.ndim == 2 or (p.ndim == 4 and p.shape[2:] == (1, 1))
        eight_bit = factored and p.shape[0] * p.shape[1] > 16384
        if id(p) not in self.state:
            zeros = torch.zeros_like(p)
            self.state[id(p)] = {"m": self.encode(zeros) if eight_bit else zeros, "v": zeros}
            if factored:  # row and column statistics of the (out, in) matrix, float32
                rows, cols = torch.zeros(p.shape[0]), torch.zeros(p.shape[1])
                self.state[id(p)].update(v_row=rows, v_col=cols, r_row=rows.clone(), r_col=cols.clone())
        s = self.state[id(p)]
        m = self.decode(s["m"]) if eight_bit else s["m"]
        square = g * g + self.eps[0]
        if factored:
            matrix = square.reshape(p.shape[:2])
            s["v_row"] = b2 * s["v_row"] + (1 - b2) * matrix.mean(dim=1)
            s["v_col"] = b2 * s["v_col"] + (1 - b2) * matrix.mean(dim=0)
            u = self.rsqrt_outer(s["v_row"], s["v_col"]).reshape(p.shape) * g
        else:
            s["v"] = b2 * s["v"] + (1 - b2) * square
            u = s["v"].rsqrt() * g
        u = u / (u.norm() / u.numel() ** 0.5 / self.clip).clamp(min=1.0)
        m = b1 * m + (1 - b1) * u
        s["m"] = self.encode(m) if eight_bit else m
        if factored:
            res = ((u - m) ** 2 + self.eps[1]).reshape(p.shape[:2])
            s["r_row"] = b3 * s["r_row"] + (1 - b3) * res.mean(dim=1)
            s["r_col"] = b3 * s["r_col"] + (1 - b3) * res.mean(dim=0)
            update = self.rsqrt_outer(s["r_row"], s["r_col"]).reshape(p.shape) * m
        else:
            update = m
        p -= self.lr * self.weight_decay * p
        p -= self.lr * update
        self.largest_step[id(p)] = max(self.largest_step.get(id(p), 0.0), float((self.lr * update).abs().max()))


def test_sana_scheme_equals_a_port_of_sanas_8bit_step():
    """Several steps of CAME-8bit with `SANA_SCHEME` against `_SanaCame8bit` on a linear (4100 outputs: chunks
    of 2048, 2048, 4), a 1x1 conv (2050 outputs), a small linear (float32 m) and a vector. Our kernels are
    (in, out), convs (1, 1, in, out). The codes may differ by one where m lands on a rounding tie (JAX and torch
    round the float32 arithmetic before it differently); everything else agrees to float32 rounding."""
    rng = np.random.default_rng(0)
    shapes = {"linear": (6, 4100), "conv": (1, 1, 9, 2050), "small": (40, 24), "bias": (24,)}
    to_torch = {"linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1), "small": lambda x: x.T,
                "bias": lambda x: x}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (rng.standard_normal(s) * 10 ** rng.uniform(-3, 1)).astype(np.float32) for k, s in shapes.items()}
             for _ in range(6)]
    lr, weight_decay = 1e-2, 0.1

    reference = _SanaCame8bit(lr, weight_decay)
    torch_params = {k: torch.tensor(np.ascontiguousarray(to_torch[k](v))) for k, v in params.items()}
    for g in grads:
        for k, p in torch_params.items():
            reference.step(p, torch.tensor(np.ascontiguousarray(to_torch[k](g[k]))))
    tx = came(lr, weight_decay=weight_decay, eight_bit=True, scheme=SANA_SCHEME)
    ours, state = _run(tx, jax.tree.map(jnp.asarray, params), grads)

    for name in ("linear", "conv"):
        mu, (p,) = state[0].mu[name], [torch_params[name]]
        assert isinstance(mu, Quantized), name
        chunks = reference.state[id(p)]["m"]
        codes = np.asarray(to_torch[name](np.asarray(mu.codes))).reshape(p.shape[:2])
        expected_codes = torch.cat([c for c, _, _ in chunks]).reshape(p.shape[:2]).numpy()
        np.testing.assert_allclose(np.asarray(mu.scale), [float(s) for _, s, _ in chunks], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(mu.offset), [float(low) for _, _, low in chunks], rtol=1e-5)
        differ = codes.astype(int) != expected_codes
        assert np.all(np.abs(codes.astype(int) - expected_codes) <= 1), name
        assert differ.mean() < 1e-3, (name, differ.sum())
    for name, p in torch_params.items():
        # Float32 rounding everywhere, except the few entries whose m took the other side of a tie once: a code
        # apart is 1/255 of the chunk's range of m, so their later steps differ by less than the largest step.
        error = np.abs(to_torch[name](np.asarray(ours[name])) - p.numpy())
        assert np.median(error) < 1e-6 and np.mean(error > 1e-5) < 1e-3, name
        assert error.max() < reference.largest_step[id(p)], (name, error.max(), reference.largest_step[id(p)])


def test_state_bytes_of_the_largest_preset():
    """Bytes per parameter from abstract states of sana1.5_4800m (nothing is allocated)."""
    from sana_jax.model import preset
    from sana_jax.model.transformer import init_params

    shapes = jax.eval_shape(init_params, preset("sana1.5_4800m"), jax.random.key(0))
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    per_param = lambda tx: state_bytes(jax.eval_shape(tx.init, shapes)) / count
    adamw, came32, came8 = (per_param(optax.adamw(1e-4)), per_param(came(1e-4)),
                            per_param(came(1e-4, eight_bit=True)))
    assert 8.0 <= adamw < 8.001
    assert 4.0 < came32 < 4.05  # m in float32 plus small statistics
    assert 1.0 < came8 <= 1.05


def test_sharded_update_matches_one_device():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from sana_jax.optim import came
        assert jax.device_count() == 8
        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        specs = {"blocks": {"to_q": ((2, 64, 96), P(None, "fsdp", None)),
                            "to_out": ((2, 96, 64), P(None, None, "fsdp")),
                            "bias": ((2, 64), P(None, "fsdp"))},
                 "depthwise": ((3, 3, 64), P(None, None, "fsdp"))}
        is_spec = lambda x: isinstance(x, tuple) and isinstance(x[1], P)
        keys = iter(jax.random.split(jax.random.key(0), 16))
        host = lambda: jax.tree.map(lambda s: np.asarray(jax.random.normal(next(keys), s[0])), specs,
                                    is_leaf=is_spec)
        params, grads = host(), host()
        shard = jax.tree.map(lambda s: NamedSharding(mesh, s[1]), specs, is_leaf=is_spec)
        tx = came(1e-3, eight_bit=True, min_8bit_size=1000, weight_decay=0.1)

        state = tx.init(jax.device_put(params, shard))
        mu, nu = state[0].mu["blocks"], state[0].nu["blocks"]
        assert mu["to_q"].codes.sharding.spec == P(None, "fsdp")
        assert mu["to_out"].codes.sharding.spec == P(None, None, "fsdp")
        assert nu["to_q"].v_row.sharding.spec == P(None, "fsdp")
        assert nu["to_out"].v_col.sharding.spec == P(None, "fsdp")
        update = jax.jit(tx.update)
        sharded = update.lower(jax.device_put(grads, shard), state, jax.device_put(params, shard)).compile()
        assert "all-gather" not in sharded.as_text()  # blocks and statistics stay inside the shards
        updates, new_state = sharded(jax.device_put(grads, shard), state, jax.device_put(params, shard))
        for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
            assert after.sharding.is_equivalent_to(before.sharding, after.ndim), before.sharding

        one = jax.devices()[0]
        expected, expected_state = update(jax.device_put(grads, one), tx.init(jax.device_put(params, one)),
                                          jax.device_put(params, one))
        for a, b in zip(jax.tree.leaves((updates, new_state)), jax.tree.leaves((expected, expected_state))):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-6, atol=1e-9)
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_bad_arguments():
    with pytest.raises(ValueError, match="b1=1.5"):
        came(1e-3, b1=1.5)
    with pytest.raises(ValueError, match="clip_threshold=0"):
        came(1e-3, clip_threshold=0)
    bad_rule = lambda path, shape: Factoring(0, (1, 0))
    with pytest.raises(ValueError, match=r"\['w'\].*\(1, 0\)"):
        came(1e-3, factoring=bad_rule).init({"w": jnp.ones((3, 4))})


@pytest.mark.slow
def test_eight_bit_tracks_float32_on_tiny_dit():
    """Flow matching on fixed random data: x_t = (1 - s) x0 + s n, target n - x0. Every factored matrix of
    the "tiny" model is quantised (min_8bit_size=0)."""
    from sana_jax.model import preset
    from sana_jax.model.transformer import forward, init_params

    config = preset("tiny")
    keys = jax.random.split(jax.random.key(0), 4)
    params = init_params(config, keys[0])
    x0 = jax.random.normal(keys[1], (16, 8, 8, config.in_channels))
    text = jax.random.normal(keys[2], (16, 4, config.caption_channels))
    mask = jnp.ones((16, 4), jnp.int32)

    def loss(p, key):
        k_noise, k_sigma = jax.random.split(key)
        noise = jax.random.normal(k_noise, x0.shape)
        sigma = jax.nn.sigmoid(jax.random.normal(k_sigma, (x0.shape[0],)))
        s = sigma[:, None, None, None]
        velocity = forward(p, config, (1 - s) * x0 + s * noise, jnp.floor(sigma * 1000), text, mask)
        return jnp.mean((velocity - (noise - x0)) ** 2)

    def train(tx, steps=200):
        def step(carry, key):
            p, state = carry
            value, grads = jax.value_and_grad(loss)(p, key)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jax.random.split(keys[3], steps)))
        (_, state), losses = run(params)
        return np.asarray(losses), state

    reference, _ = train(came(1e-3))
    losses, state = train(came(1e-3, eight_bit=True, min_8bit_size=0))
    assert isinstance(state[0].mu["blocks"]["attn1"]["to_q"]["kernel"], Quantized)
    assert reference[-20:].mean() < 0.9 * reference[:20].mean()
    assert abs(losses[-20:].mean() / reference[-20:].mean() - 1) < 0.03, (losses[-20:].mean(), reference[-20:].mean())
