"""sana_jax.benchmarking: the benchmarks' timers."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.benchmarking import (
    OpTime,
    interleaved_ms,
    matrix_products,
    median_ms,
    op_profile,
    op_time_by_kind,
    products_program,
)


def test_median_ms_counts_calls_syncs_and_reports_milliseconds():
    calls, synced = [], []

    def fn():
        calls.append(None)
        time.sleep(0.002)
        return len(calls)

    ms = median_ms(fn, synced.append, warmup=2, repeats=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert synced == [1, 2, 6, 10, 14]  # every warm-up call, then the last call of each sample
    assert 1.5 < ms < 100


def test_median_ms_blocks_on_jax_outputs_by_default():
    assert median_ms(lambda: jnp.ones(8) * 2, warmup=1, repeats=2) >= 0


def test_median_ms_rejects_no_samples():
    with pytest.raises(ValueError, match="repeats"):
        median_ms(lambda: None, repeats=0)


def test_interleaved_ms_alternates_the_calls_round_by_round():
    order = []

    def call(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
            return name
        return fn

    fns = {"a": (call("a", 0.001), lambda _: None), "b": (call("b", 0.02), lambda _: None)}
    samples = interleaved_ms(fns, rounds=3, repeats=2, warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-ups, then each round times a, then b
    assert list(samples) == ["a", "b"] and all(len(v) == 3 for v in samples.values())
    assert all(b > a for a, b in zip(samples["a"], samples["b"], strict=True))  # 20 ms sleeps read longer than 1 ms


def test_interleaved_ms_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_ms({"a": (lambda: None, lambda _: None)}, rounds=0)


def test_op_profile_puts_the_matrix_product_first_and_names_every_op():
    # A 768^3 product (0.9 GFLOP) next to an 8-element add: the product's instruction (a plain dot, or the
    # fusion whose computation holds it) must lead, every row must be an instruction of the compiled HLO.
    big, small = jnp.ones((768, 768)), jnp.ones((8,))
    compiled = jax.jit(lambda a, b: (jnp.tanh(a @ a), b + 1)).lower(big, small).compile()
    compiled(big, small)
    rows = op_profile(compiled, big, small, calls=2)
    hlo = compiled.as_text()
    assert rows and all(f"{row.op} = " in hlo and row.ms > 0 and row.events > 0 for row in rows)
    assert [row.ms for row in rows] == sorted((row.ms for row in rows), reverse=True)
    top = rows[0]
    if top.kind != "dot":
        called = re.search(rf"{re.escape(top.op)} = .*calls=%?([\w.\-]+)", hlo).group(1)
        body = hlo[hlo.index(f"{called} "):]
        assert " dot(" in body[:body.index("\n}")], (top, body[:2000])
    assert "dot" in top.kind and top.ms > 5 * rows[-1].ms
    with pytest.raises(ValueError, match="calls"):
        op_profile(compiled, big, small, calls=0)


def test_op_time_by_kind_sums_each_kind_largest_first():
    ops = [OpTime("a", "fusion kLoop", 1.0, 1), OpTime("b", "dot", 3.0, 2), OpTime("c", "fusion kLoop", 2.5, 1),
           OpTime("d", "", 0.5, 1)]
    assert list(op_time_by_kind(ops).items()) == [("fusion kLoop", 3.5), ("dot", 3.0), ("other", 0.5)]


def _scanned_and_batched(a, ws, b):
    # a (4, 8) through 7 scanned (8, 8) products, then one batched (3, 5, 6) x (3, 6, 2) product.
    def step(carry, w):
        return jnp.tanh(carry @ w), None

    carry, _ = jax.lax.scan(step, a, ws)
    return carry.sum() + jnp.einsum("bij,bjk->bik", b[0], b[1]).sum()


def test_matrix_products_lists_every_product_with_its_flops():
    a, ws, b = jnp.ones((4, 8)), jnp.ones((7, 8, 8)), (jnp.ones((3, 5, 6)), jnp.ones((3, 6, 2)))
    products = matrix_products(_scanned_and_batched, a, ws, b)
    assert [(p.lhs.shape, p.rhs.shape) for p in products] == [((4, 8), (8, 8))] * 7 + [((3, 5, 6), (3, 6, 2))]
    assert [p.flops for p in products] == [2 * 4 * 8 * 8] * 7 + [2 * 3 * 5 * 6 * 2]
    # Differentiated with respect to a and ws: per step, the forward product, a carry gradient and a weight
    # gradient (7 x 3), and the batched product, whose result the gradient does not need, once.
    grads = matrix_products(jax.grad(_scanned_and_batched, argnums=(0, 1)), a, ws, b)
    assert len(grads) == 7 * 3 + 1 and sum(p.flops for p in grads) == 7 * 3 * 2 * 4 * 8 * 8 + 2 * 3 * 5 * 6 * 2


def test_matrix_products_rejects_products_in_loops_of_unknown_length():
    def loop(a, n):
        return jax.lax.fori_loop(0, n, lambda _, c: c @ c, a)

    with pytest.raises(ValueError, match="1 matrix product.*`while`"):
        matrix_products(loop, jnp.ones((4, 4)), 3)


def test_products_program_computes_each_product_on_its_own_operands():
    products = matrix_products(_scanned_and_batched, jnp.ones((4, 8)), jnp.ones((2, 8, 8)),
                               (jnp.ones((3, 5, 6)), jnp.ones((3, 6, 2))))
    run = products_program(products, seed=1)
    outputs, (operands,) = run(), run.args
    assert len(outputs) == len(operands) == 3
    assert not np.array_equal(operands[0][0], operands[1][0])  # distinct operands: no product computed twice
    for out, (lhs, rhs) in zip(outputs, operands, strict=True):
        np.testing.assert_allclose(out, np.matmul(np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)),
                                   rtol=1e-5, atol=1e-5)
