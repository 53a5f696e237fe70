"""The training loop: one stage of training on a mesh, resumable from its workdir, and the staged runs
(train a base, grow it, keep training; or prune by importance and fine-tune)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from sana_jax import checkpoint as sana_checkpoint
from sana_jax import evaluation, surgery
from sana_jax.data.pipeline import DataConfig, element_shapes, make_train_iterator
from sana_jax.grids import save_grid
from sana_jax.model import SanaConfig, init_params, preset
from sana_jax.trainer import monitor, sharding
from sana_jax.trainer.flow_matching import evaluation_loss, noise_levels
from sana_jax.trainer.optimizers import carry_optimizer_state, learning_rate_schedule, make_optimizer
from sana_jax.trainer.step import init_train_state, make_train_step

CHECKPOINT_DIR = "checkpoints"
UNRESTORABLE_DIR = "checkpoints_unrestorable"  # checkpoints that failed to restore, moved out of the way
MODEL_DIR = "model"  # the final weights (EMA when enabled) as a sana_jax.checkpoint
# SanaConfig fields that say how the model runs, not what it is: a resumed run takes them from the config.
RUNTIME_FIELDS = ("compute_dtype", "remat", "attention_impl", "unroll_blocks", "batch_splits")


class WorkdirError(ValueError):
    """The workdir cannot continue this run; the message says why and how to go on."""


class Stopped(Exception):
    """Training stopped on SIGINT or SIGTERM once its state at `step` was saved."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; the same command resumes")
        self.step, self.signum = step, signum


def model_config_for(config: ConfigDict, data_config: DataConfig) -> SanaConfig:
    """The config's preset and overrides, with channels and sample size taken from the data."""
    shapes_ = element_shapes(data_config)
    latent_h, _, latent_c = shapes_["latents"]
    return dataclasses.replace(
        preset(config.model.preset), in_channels=latent_c, out_channels=latent_c,
        caption_channels=shapes_["text"][-1], sample_size=latent_h,
        compute_dtype=config.training.compute_dtype, remat=config.training.remat,
        **dict(config.model.overrides))


def _checkpoint_manager(workdir: Path, config: ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, keep_period=config.keep_every or None,
        enable_async_checkpointing=config.async_checkpointing, create=True)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def saved_model_config(workdir: Path) -> SanaConfig | None:
    """The model config of the newest checkpoint in a workdir that records one, or None when none does."""
    manager = ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute())
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            return SanaConfig.from_dict(meta["model_config"])
        except Exception:  # a damaged checkpoint: `train` reports it when it fails to restore
            continue
    return None


def _base_section(config: ConfigDict) -> ConfigDict:
    if "base" not in config or config.base is None:
        raise ValueError("this run needs a base model: set growth/prune.base_checkpoint or a `base` section")
    return config.base


def planned_model_config(config: ConfigDict) -> SanaConfig:
    """The model a config trains, found without training: its init checkpoint's, its preset's with the
    overrides, or for a growth or prune run its base model's at the target depth."""
    stage = config.growth if config.growth is not None else config.prune
    if stage is not None:
        base = (sana_checkpoint.load_config(stage.base_checkpoint) if stage.base_checkpoint
                else planned_model_config(_base_section(config)))
        return dataclasses.replace(base, depth=stage.target_depth)
    if config.init_checkpoint:
        return sana_checkpoint.load_config(config.init_checkpoint)
    return model_config_for(config, DataConfig.from_mapping(config.data))


def resumed_model_config(saved: SanaConfig, planned: SanaConfig, *, workdir: Path,
                         keep_saved: bool) -> SanaConfig:
    """The saved model with the planned runtime fields; raises WorkdirError naming the fields where the saved
    model is not the planned one, unless `keep_saved` (config.resume_saved_model)."""
    differing = [f.name for f in dataclasses.fields(SanaConfig)
                 if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(planned, f.name)]
    if differing and not keep_saved:
        diffs = "; ".join(f"{name}: saved {getattr(saved, name)!r}, config {getattr(planned, name)!r}"
                          for name in differing)
        raise WorkdirError(f"{workdir / CHECKPOINT_DIR} holds another model than the config asks for ({diffs}); "
                           "start over with another --workdir, or pass --config.resume_saved_model=True to keep "
                           "training the saved model")
    return dataclasses.replace(saved, **{name: getattr(planned, name) for name in RUNTIME_FIELDS})


def _restore_newest(manager: ocp.CheckpointManager, workdir: Path,
                    restore: Callable[[int], Any]) -> tuple[int, Any] | None:
    """(step, restore(step)) for the newest step that restores, or None when there are no checkpoints.

    Newer steps that fail to restore are moved to UNRESTORABLE_DIR with a one-line warning each.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(step)
        except Exception as error:  # orbax, tensorstore and json raise many types on damaged files
            failed.append((step, _root_cause(error)))
            continue
        for bad, reason in failed:
            moved = _move_aside(workdir, bad)
            logging.warning(f"checkpoint step {bad} in {workdir / CHECKPOINT_DIR} cannot be restored ({reason}); "
                            f"moved it to {moved}, resuming from step {step}")
        if failed:
            manager.reload()
        return step, restored
    if failed:
        raise WorkdirError(f"no checkpoint in {workdir / CHECKPOINT_DIR} can be restored (step {failed[0][0]}: "
                           f"{failed[0][1]}); start over with another --workdir, or move {workdir / CHECKPOINT_DIR} "
                           "aside")
    return None


def _root_cause(error: BaseException) -> str:
    """The type and first line of the innermost cause of `error`, in at most 200 characters."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def _move_aside(workdir: Path, step: int) -> Path:
    """Moves checkpoint `step` to UNRESTORABLE_DIR (on process 0); returns where it went."""
    target = workdir / UNRESTORABLE_DIR / str(step)
    suffix = 0
    while target.exists():
        suffix += 1
        target = workdir / UNRESTORABLE_DIR / f"{step}.{suffix}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(workdir / CHECKPOINT_DIR / str(step), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"sana_jax.trainer moved checkpoint {step}")
    return target


@dataclasses.dataclass
class _StopSignal:
    signum: int | None = None

    def check(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """Whether to stop after `step`: a signal was caught, or a multi-process run is being preempted."""
        if self.signum is None and jax.process_count() > 1 and manager.reached_preemption(step):
            self.signum = signal.SIGTERM
        return self.signum is not None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopSignal]:
    """Within: the first SIGINT or SIGTERM is recorded instead of acting (a second one acts as usual).

    Only in the main thread of a single-process run: multi-process runs take SIGTERM through JAX's
    preemption sync point (`CheckpointManager.reached_preemption`).
    """
    stop = _StopSignal()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def record(signum, frame):
        stop.signum = signum
        for s, handler in previous.items():
            signal.signal(s, handler)

    for signum in previous:
        signal.signal(signum, record)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _final_model_step(workdir: Path) -> int | None:
    """The step whose final weights model/ holds, or None when there is no model/."""
    path = workdir / MODEL_DIR
    return sana_checkpoint.load_metadata(path).get("step") if (path / sana_checkpoint.CONFIG_FILE).is_file() else None


def train(config: ConfigDict, workdir: str | Path, *, params: dict | None = None,
          model_config: SanaConfig | None = None, stage: str = "", opt_state: Any = None) -> tuple[SanaConfig, dict]:
    """Trains for `config.steps` steps in `workdir`, resuming from its newest restorable checkpoint if any.

    With `config.time_budget_s` > 0 the stage ends earlier, after the first compiled call that finds the
    budget spent (wall seconds since the stage started, added up over resumes, plus `config.time_reserve_steps`
    steps at the stage's pace), and finishes as at its last step: evaluation, samples and model/ (its metadata
    records the step reached).

    Args:
      config: a training config (see `sana_jax.trainer.config`).
      workdir: receives checkpoints/, metrics.jsonl, tensorboard/, samples/ and model/ (rewritten at the end
        of every run that changes it).
      params, model_config: starting weights and their architecture (e.g. a grown model); by default
        `config.init_checkpoint` or a fresh init of the config's model. Checkpoints of another model in
        `workdir` are refused unless `config.resume_saved_model`.
      stage: a label for the progress bar and the metrics.
      opt_state: on a fresh start, the optimizer state to continue from (an earlier stage's, restacked to
        this model by `surgery.restack`; see `optimizers.carry_optimizer_state`); None starts a new one.
    Returns:
      The model config and its final params (the EMA weights when `training.ema_decay` > 0).
    Raises:
      Stopped: on SIGINT or SIGTERM, once the state at the current step is saved.
    """
    model_config, final, _ = _train_stage(config, Path(workdir), params=params, model_config=model_config,
                                          stage=stage, opt_state=opt_state)
    return model_config, final


def _train_stage(config: ConfigDict, workdir: Path, *, params: dict | None = None,
                 model_config: SanaConfig | None = None, stage: str = "",
                 opt_state: Any = None) -> tuple[SanaConfig, dict, dict]:
    """`train`, also returning the final train state (params, optimizer state, step)."""
    with _stop_on_signals() as stop:
        return _train(config, workdir, params, model_config, stage, stop, opt_state)


def _train(config: ConfigDict, workdir: Path, params: dict | None, model_config: SanaConfig | None, stage: str,
           stop: _StopSignal, opt_state: Any) -> tuple[SanaConfig, dict, dict]:
    started = time.monotonic()
    data_config = DataConfig.from_mapping(config.data)
    planned = model_config or planned_model_config(config)
    saved = saved_model_config(workdir)
    if saved is not None:
        model_config = resumed_model_config(saved, planned, workdir=workdir, keep_saved=config.resume_saved_model)
    else:
        model_config = planned
        if params is None and config.init_checkpoint:
            _, params = sana_checkpoint.load(config.init_checkpoint)
    # How the model runs follows this stage's config, also where the model comes from a base or a surgery.
    runtime = {name: value for name, value in dict(config.model.overrides).items() if name in RUNTIME_FIELDS}
    model_config = dataclasses.replace(model_config, **{**runtime, "compute_dtype": config.training.compute_dtype,
                                                        "remat": config.training.remat})

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    if mesh.size > 1:
        # The mesh runs the batch in parts already; sliced further, a sharded batch would move between devices.
        model_config = dataclasses.replace(model_config, batch_splits=1)
    tx = make_optimizer(config.optimizer, config.steps)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    use_ema = config.training.ema_decay > 0
    abstract_params = jax.eval_shape(init_params, model_config, jax.random.key(0))
    params_sharding = sharding.param_shardings(model_config, abstract_params, mesh)
    build_state = jax.jit(lambda p: init_train_state(p, tx, ema=use_ema), in_shardings=(params_sharding,))
    state_sharding = build_state.lower(abstract_params).compile().output_shardings
    build_state = jax.jit(lambda p: init_train_state(p, tx, ema=use_ema), in_shardings=(params_sharding,),
                          out_shardings=state_sharding)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(build_state, abstract_params), state_sharding)

    data_iter = make_train_iterator(data_config, seed=config.seed, batch_size=config.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    manager = _checkpoint_manager(workdir, config)
    # Read once, before any process rewrites model/: every process must agree on finishing the run.
    final_model_step = _final_model_step(workdir)
    restored = _restore_newest(manager, workdir, lambda step: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore())))
    if restored is not None:
        start, items = restored
        state, seconds_before = items.state, items.meta.get("train_seconds", 0.0)
        tqdm.write(f"resumed {workdir} from step {start}")
    else:
        start, seconds_before = 0, 0.0
        if params is None:
            params = jax.jit(init_params, static_argnums=0, out_shardings=params_sharding)(
                model_config, jax.random.key(config.seed))
        state = build_state(jax.device_put(params, params_sharding))
        if opt_state is not None:
            # Jitted: one compilation instead of one per eager op of the 8-bit quantisation (seconds on CPU).
            carry = jax.jit(carry_optimizer_state, static_argnames="eight_bit_scheme",
                            out_shardings=state_sharding["opt_state"])
            state["opt_state"] = carry(state["opt_state"], opt_state,
                                       eight_bit_scheme=config.optimizer.eight_bit_scheme)

    def train_seconds() -> float:
        return seconds_before + time.monotonic() - started

    # The stage's pace without its compilation: (train seconds, step) when the first call was found done and when
    # the latest one was. The budget keeps `time_reserve_steps` steps at this pace for what follows the stage.
    first_done = latest_done = None

    def out_of_time() -> bool:
        """Whether the time budget less the reserve is spent, by process 0's clock (every process must stop at
        the same step)."""
        if not config.time_budget_s:
            return False
        seconds = train_seconds()
        if first_done is not None and latest_done[1] > first_done[1]:
            seconds_per_step = (latest_done[0] - first_done[0]) / (latest_done[1] - first_done[1])
            seconds += config.time_reserve_steps * seconds_per_step
        spent = seconds >= config.time_budget_s
        if jax.process_count() > 1:
            spent = bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
        return spent

    # A fresh stage runs at least one call; a resumed one whose budget was spent before has nothing left to train.
    end = start if start and out_of_time() else config.steps
    finish = start < end or final_model_step != end  # train, evaluate, sample and write model/

    train_step = make_train_step(model_config, tx, schedule, seed=config.seed,
                                 noise_levels=noise_levels(config.training), grad_accum=config.training.grad_accum,
                                 ema_decay=config.training.ema_decay)
    # (state, K stacked batches) -> (state, metrics stacked (K,)): K steps in one compiled call.
    steps_fn = jax.jit(functools.partial(jax.lax.scan, train_step),
                       in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sharding, None), donate_argnums=0)
    per_call = steps_per_call(config, start)
    if per_call != config.steps_per_call:
        tqdm.write(f"{stage or 'train'}: {per_call} steps per call, the largest count that divides "
                   f"steps_per_call={config.steps_per_call}, the steps, the intervals and the first step {start}")

    evaluate = _make_evaluation(config, data_config, model_config, mesh)
    writer = monitor.MetricWriter(workdir, resume_step=start, stage=stage)
    meta = {"model_config": dataclasses.asdict(model_config), "stage": stage}

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({**meta, "train_seconds": train_seconds()})))

    def sample(step: int) -> None:
        if not config.sampling.num_prompts:
            return
        eval_params = state["ema_params"] if use_ema else state["params"]
        metrics = sample_and_score(eval_params, model_config, data_config, config.sampling,
                                   workdir / "samples" / f"step_{step:06d}.png", title=f"{stage} step {step}")
        writer.write(step, metrics)

    def evaluate_and_log(step: int) -> None:
        if evaluate is not None:
            writer.write(step, {"eval_loss": evaluate(state["ema_params"] if use_ema else state["params"])})

    if start == 0 and config.sample_every:
        sample(0)
    if start == 0 and config.eval_every:
        evaluate_and_log(0)
    throughput = monitor.Throughput(config.batch_size)
    pending, previous, reached = [], None, start
    bar = tqdm(initial=start, total=config.steps, desc=stage or "train", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    for first in range(start, end, per_call):
        batches = sharding.global_batches([next(data_iter) for _ in range(per_call)], mesh)
        state, metrics = steps_fn(state, batches)
        pending.append(metrics)
        if previous is not None:  # the call before this one, done by now or soon: its longest run of skips
            in_a_row = int(np.max(previous["nonfinite_in_a_row"]))  # waits for that call
            latest_done = (train_seconds(), first)
            first_done = first_done or latest_done
            if in_a_row >= config.max_nonfinite_in_a_row:
                raise FloatingPointError(
                    f"{in_a_row} updates in a row had a non-finite loss or gradient "
                    f"(max_nonfinite_in_a_row={config.max_nonfinite_in_a_row}); stopped at step {first}. The last "
                    f"good checkpoint is in {workdir / CHECKPOINT_DIR}.")
        previous = metrics
        done = reached = first + per_call
        bar.update(per_call)
        budget_spent = out_of_time()
        last = done == config.steps or budget_spent
        if done % config.log_every == 0 or last:
            calls = jax.device_get(pending)
            fetched = {key: np.concatenate([m[key] for m in calls]) for key in calls[0]}
            row = {"loss": float(np.mean(fetched["loss"])), "grad_norm": float(np.mean(fetched["grad_norm"])),
                   "learning_rate": float(fetched["learning_rate"][-1]),
                   "skipped": float(np.sum(fetched["skipped"])),
                   "nonfinite_total": float(fetched["nonfinite_total"][-1]),
                   **throughput.update(done)}
            pending = []
            writer.write(done, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_s']:.2f}",
                            img_s=f"{row['images_per_s']:.1f}")
        stopping = stop.check(manager, done)
        if done % config.checkpoint_every == 0 or last or stopping:
            save(done)
        if stopping or last:
            break
        if config.sample_every and done % config.sample_every == 0 and done != config.steps:
            sample(done)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            evaluate_and_log(done)
    bar.close()
    if reached < config.steps and stop.signum is None:
        reserve = f", time_reserve_steps={config.time_reserve_steps}" if config.time_reserve_steps else ""
        tqdm.write(f"{stage or 'train'}: the time budget (time_budget_s={config.time_budget_s:g}{reserve}) ended "
                   f"training at step {reached} of {config.steps}; steps={reached} with time_budget_s=0 repeats "
                   "these steps")
    if finish and stop.signum is None:
        evaluate_and_log(reached)
        sample(reached)
    manager.wait_until_finished()  # an interrupted run too: its last save completes
    manager.close()
    writer.close()
    if stop.signum is not None:
        raise Stopped(reached, stop.signum)
    final = state["ema_params"] if use_ema else state["params"]
    if finish:  # on every process: orbax writes each process's shards and synchronizes them
        sana_checkpoint.save(workdir / MODEL_DIR, model_config, final,
                             metadata={**model_metadata(config), "step": reached}, overwrite=True)
    return model_config, final, state


def steps_per_call(config: ConfigDict, start: int) -> int:
    """The training steps each compiled call runs: the largest divisor of `config.steps_per_call` that also
    divides the steps, the log, checkpoint, evaluation and sample intervals and the step `start`, so that every
    one of those falls between calls."""
    return math.gcd(config.steps_per_call, config.steps, config.log_every, config.checkpoint_every,
                    config.eval_every, config.sample_every, start)


def _make_evaluation(config: ConfigDict, data_config: DataConfig, model_config: SanaConfig, mesh):
    """params -> the flow-matching loss on `config.eval_batches` fixed batches with fixed noise, or None.

    On the shapes domain the batches come from another domain seed than training (held out); other
    sources evaluate on a fixed sample of their training data.
    """
    if not config.eval_batches:
        return None
    held_out = {"caption_dropout": 0.0}
    if data_config.source == "shapes":
        held_out["domain_seed"] = data_config.domain_seed + 1
    iterator = make_train_iterator(dataclasses.replace(data_config, **held_out), seed=config.seed + 1,
                                   batch_size=config.batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    batches = sharding.global_batches([next(iterator) for _ in range(config.eval_batches)], mesh,
                                      keys=("latents", "text", "text_mask"))
    # A program called a dozen times a run: the scanned block loop compiles in about half the time of the
    # unrolled one, for the same loss (docs/performance.md).
    scanned = dataclasses.replace(model_config, unroll_blocks=False)
    loss = jax.jit(lambda p: evaluation_loss(p, scanned, batches, jax.random.key(config.seed + 2),
                                             **noise_levels(config.training)))
    return lambda params: float(loss(params))


def sample_and_score(params: dict, model_config: SanaConfig, data_config: DataConfig, sampling: ConfigDict,
                     grid_path: Path, *, title: str = "") -> dict[str, float]:
    """Samples the fixed evaluation prompts, writes a grid PNG with the checker's verdicts and returns
    {"sample_accuracy": overall, "sample_accuracy/<task>": accuracy per task}."""
    result = evaluation.evaluate(params, model_config, data_config, num_prompts=sampling.num_prompts,
                                 seed=sampling.eval_seed, num_steps=sampling.num_steps,
                                 guidance_scale=sampling.guidance_scale, shift=sampling.shift,
                                 solver=sampling.solver)
    accuracy = result.accuracy()
    if jax.process_index() == 0:
        n = sampling.grid_size
        save_grid(grid_path, result.images[:n], result.prompts[:n], verdicts=result.verdicts[:n],
                  title=f"{title}  GenEval-lite {accuracy['overall']:.2f} on {len(result.prompts)} prompts")
    return {"sample_accuracy": accuracy["overall"],
            **{f"sample_accuracy/{task}": value for task, value in accuracy.items() if task != "overall"}}


def model_metadata(config: ConfigDict) -> dict:
    """What `model/` records beside the weights so that it samples as it was evaluated: the data settings
    (latent space and text encoder) and the sampler."""
    sampling = config.sampling
    return {"data": dataclasses.asdict(DataConfig.from_mapping(config.data)),
            "sampling": {"num_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
                         "shift": sampling.shift, "solver": sampling.solver}}


def _load_or_train_base(config: ConfigDict, workdir: Path,
                        base_checkpoint: str) -> tuple[SanaConfig, dict, dict | None]:
    """The base model's config and params, and its final train state when it was trained in this run."""
    if base_checkpoint:
        return (*sana_checkpoint.load(base_checkpoint), None)
    return _train_stage(_base_section(config), workdir / "base", stage="base")


def _carried_optimizer_state(stage_config: ConfigDict, base_state: dict | None, plan: surgery.DepthPlan) -> Any:
    """The base's final optimizer state restacked by the surgery's `plan` when the stage carries it, else None."""
    if stage_config.optimizer_state != "carry":
        return None
    return surgery.restack(base_state["opt_state"], plan)


def run(config: ConfigDict, workdir: str | Path) -> tuple[SanaConfig, dict]:
    """The whole job of a config: a plain run, or base -> grow -> train, or base -> prune -> fine-tune."""
    workdir = Path(workdir)
    if config.growth is None and config.prune is None:
        return train(config, workdir)
    if saved_model_config(workdir) is not None:  # the final stage already started: resume it
        return train(config, workdir, model_config=planned_model_config(config),
                     stage="grow" if config.growth is not None else "prune")
    if config.growth is not None:
        g = config.growth
        base_config, base_params, base_state = _load_or_train_base(config, workdir, g.base_checkpoint)
        keep = None if g.keep < 0 else g.keep
        plan = surgery.growth_plan(base_config.depth, target_depth=g.target_depth, strategy=g.strategy, keep=keep,
                                   zero_copies=g.zero_copies)
        new_config, new_params = surgery.grow(
            base_params, base_config, target_depth=g.target_depth, strategy=g.strategy, keep=keep,
            zero_copies=g.zero_copies, key=jax.random.key(config.seed + 1))
        _write_json(workdir / "surgery.json", {"kind": "growth", "from_depth": base_config.depth,
                                               "to_depth": new_config.depth, "strategy": g.strategy,
                                               "optimizer_state": g.optimizer_state})
        return train(config, workdir, params=new_params, model_config=new_config, stage="grow",
                     opt_state=_carried_optimizer_state(g, base_state, plan))

    p = config.prune
    base_config, base_params, base_state = _load_or_train_base(config, workdir, p.base_checkpoint)
    keep_blocks = choose_blocks_to_keep(base_params, base_config, config, p)
    new_config, new_params = surgery.prune(base_params, base_config, keep_blocks)
    _write_json(workdir / "surgery.json", {"kind": "prune", "method": p.method, "from_depth": base_config.depth,
                                           "kept_blocks": [int(i) for i in keep_blocks],
                                           "optimizer_state": p.optimizer_state})
    return train(config, workdir, params=new_params, model_config=new_config, stage="prune",
                 opt_state=_carried_optimizer_state(p, base_state,
                                                    surgery.pruning_plan(base_config.depth, keep_blocks)))


def choose_blocks_to_keep(params: dict, model_config: SanaConfig, config: ConfigDict,
                          prune_config: ConfigDict) -> list[int]:
    """Indices of the blocks to keep: the most important (block importance), random, or the first ones."""
    n = prune_config.target_depth
    if n > model_config.depth:
        raise ValueError(f"prune.target_depth={n} exceeds the base model's depth {model_config.depth}")
    if prune_config.method == "last":
        return list(range(n))
    if prune_config.method == "random":
        rng = np.random.default_rng(config.seed)
        return sorted(rng.choice(model_config.depth, n, replace=False).tolist())
    data_config = DataConfig.from_mapping({**config.data.to_dict(), "caption_dropout": 0.0})
    iterator = make_train_iterator(data_config, seed=config.seed + 7, batch_size=config.batch_size,
                                   process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(prune_config.calibration_batches)]
    importance = surgery.block_importance(params, model_config, batches,
                                          timesteps=jnp.asarray(prune_config.timesteps, jnp.float32))
    return surgery.most_important_blocks(np.asarray(importance), n)


def _write_json(path: Path, value: dict) -> None:
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")
