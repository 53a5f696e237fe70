"""The benchmarks' timers: one callable, several in alternation, a compiled program's time per HLO op, and the
matrix products of a traced function as a program of their own."""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core


def median_ms(fn: Callable[[], Any], sync: Callable[[Any], Any] = jax.block_until_ready, *, warmup: int = 2,
              repeats: int = 5, inner: int = 1) -> float:
    """Median over `repeats` samples of the mean wall time of `inner` back-to-back `fn()` calls, in ms.

    `warmup` untimed calls come first (compilation, autotuning). `sync(out)` waits until a result is ready:
    after every warm-up call and after the last call of each sample. The default blocks on JAX arrays; pass
    e.g. `lambda _: torch.cuda.synchronize()` for torch.
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be at least 1, got {repeats} and {inner}")
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(out)
        samples.append((time.perf_counter() - start) / inner)
    return 1e3 * float(np.median(samples))


def interleaved_ms(fns: Mapping[str, tuple[Callable[[], Any], Callable[[Any], Any]]], *, rounds: int = 3,
                   repeats: int = 5, warmup: int = 2) -> dict[str, list[float]]:
    """Times several `(fn, sync)` pairs in alternation: name -> one `median_ms` per round, in ms.

    Each round times every pair in turn (`repeats` calls each), so a host whose speed drifts during the run
    (other tenants, clock changes) slows all of them alike and their per-round ratios stay comparable.
    `warmup` untimed calls of each pair come first, once.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for fn, sync in fns.values():
        for _ in range(warmup):
            sync(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, sync) in fns.items():
            samples[name].append(median_ms(fn, sync, warmup=0, repeats=repeats))
    return samples


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One HLO instruction's share of a compiled program's time (`op_profile`)."""

    op: str  # the instruction's name in the compiled HLO, e.g. "loop_multiply_fusion.3"
    kind: str  # `instruction_kinds`: "fusion kLoop", "fusion kCustom (dot)", "custom-call __cublas$gemm", ...
    ms: float  # per call, summed over its events
    events: float  # trace events per call: kernel launches on a GPU, thunk runs on a CPU


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_DETAIL = re.compile(r'(?:\bkind=(k\w+)|custom_call_target="([^"]+)")')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_HEAVY = ("dot", "convolution", "reduce")  # what a fusion's kind names when its computation holds one


def instruction_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> what it is, in a compiled module's text: the opcode, with a fusion's kind and the
    heaviest of dot / convolution / reduce its computation holds ("fusion kLoop (reduce)"), or a custom
    call's target ("custom-call __cublas$gemm")."""
    opcodes: dict[str, set[str]] = {}  # computation -> the opcodes in it
    instructions = []  # (name, opcode, the rest of the line)
    computation = None
    for line in hlo_text.splitlines():
        if start := _COMPUTATION.match(line):  # computations start at column 0, instructions are indented
            computation = start.group(1)
            opcodes[computation] = set()
        elif match := _INSTRUCTION.match(line):
            instructions.append(match.groups())
            if computation is not None:
                opcodes[computation].add(match.group(2))
    kinds = {}
    for name, opcode, rest in instructions:
        kind = opcode
        if opcode in ("fusion", "custom-call") and (detail := _DETAIL.search(rest)):
            kind = f"{opcode} {detail.group(1) or detail.group(2)}"
        if opcode == "fusion" and (called := _CALLS.search(rest)):
            heavy = [op for op in _HEAVY if op in opcodes.get(called.group(1), ())]
            kind += f" ({heavy[0]})" if heavy else ""
        kinds[name] = kind
    return kinds


def op_profile(compiled: jax.stages.Compiled, *args: Any, calls: int = 3) -> list[OpTime]:
    """Where a compiled program's time goes, per HLO instruction, costliest first.

    Traces `calls` calls with `jax.profiler` (Perfetto trace events) and sums each instruction's events: on a
    GPU the kernels' time on the device, on a CPU the runtime's time per thunk (thunks on different threads
    overlap, so the sum may exceed the wall time). Call the program once before, so that neither compilation
    nor autotuning is traced.
    """
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.get("ph") != "X" or (device_pids and event.get("pid") not in device_pids):
            continue
        op = event.get("args", {}).get("hlo_op") or (event["name"] if device_pids else None)
        if op:
            total = totals.setdefault(op, [0.0, 0])
            total[0] += event.get("dur", 0.0)
            total[1] += 1
    kinds = instruction_kinds(compiled.as_text())
    rows = [OpTime(op, kinds.get(op, ""), us / 1e3 / calls, count / calls) for op, (us, count) in totals.items()]
    return sorted(rows, key=lambda row: -row.ms)


def op_time_by_kind(ops: list[OpTime]) -> dict[str, float]:
    """ms per call summed by `OpTime.kind` ("other" where the HLO does not name the op), largest first."""
    totals: dict[str, float] = {}
    for op in ops:
        kind = op.kind or "other"
        totals[kind] = totals.get(kind, 0.0) + op.ms
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


@dataclasses.dataclass(frozen=True)
class MatrixProduct:
    """One `jax.lax.dot_general` of a traced function: its operands' shapes and dtypes and its parameters."""

    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    dimension_numbers: tuple  # ((lhs contracting, rhs contracting), (lhs batch, rhs batch))
    precision: Any
    preferred_element_type: Any

    @property
    def flops(self) -> int:
        """2 x batch x rows x columns x contracted length."""
        (lhs_contracting, _), (lhs_batch, _) = self.dimension_numbers
        shared = math.prod(self.lhs.shape[i] for i in (*lhs_contracting, *lhs_batch))
        return 2 * math.prod(self.lhs.shape) * math.prod(self.rhs.shape) // shared


def matrix_products(fn: Callable[..., Any], *args: Any) -> list[MatrixProduct]:
    """Every matrix product `fn(*args)` computes, in program order; a scan's once per iteration.

    Raises ValueError where a product sits in a `while` loop or a `cond` branch, whose count is only known
    when the program runs.
    """
    return _products_in(jax.make_jaxpr(fn)(*args).jaxpr, times=1)


def _products_in(jaxpr: jax_core.Jaxpr, times: int) -> list[MatrixProduct]:
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
            found += [MatrixProduct(lhs, rhs, eqn.params["dimension_numbers"], eqn.params["precision"],
                                    eqn.params["preferred_element_type"])] * times
            continue
        repeat = eqn.params["length"] if name == "scan" else 1
        inner = []
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = sub.jaxpr if isinstance(sub, jax_core.ClosedJaxpr) else sub
                if isinstance(sub, jax_core.Jaxpr):
                    inner += _products_in(sub, times * repeat)
        if inner and name in ("while", "cond"):
            raise ValueError(f"{len(inner)} matrix product(s) inside a `{name}`: their count is only known "
                             "when the program runs")
        found += inner
    return found


def products_program(products: Sequence[MatrixProduct], seed: int = 0) -> Callable[[], list[jax.Array]]:
    """The `products` alone, compiled as one program on random normal operands (made once, one pair per
    product so that none is computed twice): a call without arguments.

    Timing it gives a floor under any program that computes these products: no other work, and nothing
    orders the products, so the runtime may overlap them.
    """
    rng = np.random.default_rng(seed)
    operands = [tuple(jnp.asarray(rng.standard_normal(side.shape), side.dtype) for side in (p.lhs, p.rhs))
                for p in products]

    def run(operands):
        return [jax.lax.dot_general(lhs, rhs, p.dimension_numbers, p.precision,
                                    preferred_element_type=p.preferred_element_type)
                for p, (lhs, rhs) in zip(products, operands, strict=True)]

    return functools.partial(jax.jit(run).lower(operands).compile(), operands)
