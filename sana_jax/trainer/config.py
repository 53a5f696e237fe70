"""The training config schema: defaults for every field, and checks that run before any compile.

Config files under `configs/` start from `default_config()` and change fields; `validate` rejects unknown
fields and impossible combinations, naming the field.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from sana_jax.data import shapes
from sana_jax.data.pipeline import DataConfig
from sana_jax.model import PRESETS
from sana_jax.surgery import DEFAULT_TIMESTEPS, STRATEGIES
from sana_jax.trainer.optimizers import EIGHT_BIT_SCHEMES, OPTIMIZERS, SCHEDULES

PRUNE_METHODS = ("importance", "random", "last")
# What the stage after a growth or a pruning starts its optimizer from: a new state, or the base stage's final
# state restacked by the same surgery (`optimizers.carry_optimizer_state`).
OPTIMIZER_STATES = ("fresh", "carry")


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 1000
    # Wall seconds after which the stage ends at the next compiled call, as at its last step (0: no limit). They
    # count from the stage's start (compilation, grids and held-out losses included) and add up over resumes; the
    # step reached varies with the machine's speed, and `steps` set to it with no budget repeats the run.
    c.time_budget_s = 0.0
    # With a budget: steps' worth of wall time at the stage's own pace (measured after its first call, compilation
    # excluded, grids and held-out losses included) kept out of the budget for what follows the stage, so that
    # e.g. a later stage's share grows with a slower machine as the stage's own steps do.
    c.time_reserve_steps = 0
    c.batch_size = 32
    c.log_every = 25
    # Training steps that one compiled call runs in a loop on K batches (at most: the trainer runs the largest
    # count that also divides the steps, the log, checkpoint, eval and sample intervals and a resumed step,
    # `loop.steps_per_call`). On CPU each call allocates and zeroes XLA's scratch memory afresh, so several steps
    # per call are faster; the updates are the same.
    c.steps_per_call = 1
    c.checkpoint_every = 250
    c.keep_checkpoints = 2  # the latest N
    c.keep_every = 0  # and every K-th step for good (0: none)
    c.async_checkpointing = True
    c.sample_every = 0  # sample grid + checker accuracy every N steps (0: only at the end)
    c.eval_every = 0  # held-out flow-matching loss every N steps (0: only at the end)
    c.eval_batches = 4  # batches of `batch_size` in that loss (0: no evaluation)
    c.max_nonfinite_in_a_row = 20  # consecutive skipped updates before the run stops
    c.init_checkpoint = ""  # start from these weights (a sana_jax.checkpoint directory)
    # A workdir whose checkpoints hold another model than this config's is refused; True resumes it anyway.
    c.resume_saved_model = False

    c.mesh = ConfigDict({"data": -1, "fsdp": 1})

    # The model: a preset plus field overrides. Channel counts and sample size follow the data.
    c.model = ConfigDict({"preset": "tiny", "overrides": {}})

    # sana_jax.data.DataConfig fields. `tasks` (the shapes domain's, in turn; repeat one to weight it) is listed
    # so that the command line can set it: --config.data.tasks="('position',)".
    c.data = ConfigDict({"source": "shapes", "resolution": 32, "caption_dropout": 0.1, "tasks": shapes.TASKS})

    c.optimizer = ConfigDict({
        "name": "came", "lr": 2e-4, "schedule": "constant", "warmup_steps": 100, "end_lr": 0.0,
        "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "clip_grad_norm": 1.0,
        # CAME's decay of the instability EMA (AdamW ignores it). Without bias correction its step starts large
        # and settles as about 1 / sqrt(1 - b3^t): 2.2x the learning rate at step 2400 with SANA's 0.9999.
        "b3": 0.9999,
        # CAME-8bit's first-moment code: "dynamic" (per-row dynamic code) or "sana" (SANA's min-max blocks of 2048).
        "eight_bit_scheme": "dynamic",
    })
    c.training = ConfigDict({
        "shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0, "uniform_fraction": 0.0, "grad_accum": 1, "ema_decay": 0.0,
        "compute_dtype": "float32", "remat": "none",
    })
    c.sampling = ConfigDict({  # num_prompts 0: no sampling
        "num_prompts": 32, "grid_size": 16, "num_steps": 20, "guidance_scale": 4.5, "shift": 1.0,
        "solver": "flow_dpm_solver", "eval_seed": 1234,
    })
    # Optional stages (see configs/grow.py and configs/prune.py); None when unused.
    c.growth = None
    c.prune = None
    return c


def growth_defaults() -> ConfigDict:
    return ConfigDict({
        "target_depth": 12, "strategy": "partial_preservation", "keep": -1, "zero_copies": False,
        "optimizer_state": "fresh",  # or "carry" (OPTIMIZER_STATES): needs a base trained in this run
        # The base model: a checkpoint directory (a sana_jax.checkpoint) or, when empty or absent, a base run
        # trained first in <workdir>/base with the `base` config section.
        "base_checkpoint": "",
    })


def prune_defaults() -> ConfigDict:
    return ConfigDict({
        "target_depth": 6, "method": "importance", "calibration_batches": 4,
        "timesteps": DEFAULT_TIMESTEPS, "base_checkpoint": "", "optimizer_state": "fresh",
    })


# Sections checked elsewhere: model overrides by SanaConfig, data by DataConfig.
_FREE_SECTIONS = ("overrides", "data")


def _check_fields(config: ConfigDict, schema: ConfigDict, prefix: str) -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ValueError(f"unknown config field {name!r}; known fields here: {sorted(schema.keys())}")
        value, default = config[key], schema[key]
        if isinstance(default, ConfigDict) and key not in _FREE_SECTIONS and value is not None:
            if not isinstance(value, ConfigDict):
                raise ValueError(f"config field {name!r} must be a section, got {value!r}")
            _check_fields(value, default, name + ".")


def validate(config: ConfigDict, *, num_devices: int) -> None:
    """Raises ValueError naming the first unknown field or impossible value."""
    schema = default_config()
    schema.growth = growth_defaults()
    schema.prune = prune_defaults()
    schema.base = default_config()  # the growth stage's base run
    _check_fields(config, schema, "")

    def require(ok: bool, field: str, expected: str):
        if not ok:
            value = config
            for part in field.split("."):
                value = value[part]
            raise ValueError(f"config.{field}={value!r}: expected {expected}")

    try:
        DataConfig.from_mapping(config.data)
    except ValueError as error:
        raise ValueError(f"config.data: {error}") from None
    for field in ("steps", "batch_size", "log_every", "checkpoint_every", "steps_per_call"):
        require(isinstance(config[field], int) and config[field] > 0, field, "a positive integer")
    require(config.eval_every >= 0, "eval_every", ">= 0")
    require(config.time_budget_s >= 0, "time_budget_s", "seconds >= 0 (0: no limit)")
    require(not (config.time_budget_s and config.optimizer.schedule != "constant"), "time_budget_s",
            "0 with a decaying learning rate (it is laid out over `steps`, which the budget may cut short), or "
            "optimizer.schedule='constant'")
    require(isinstance(config.time_reserve_steps, int) and config.time_reserve_steps >= 0, "time_reserve_steps",
            "an integer >= 0")
    require(config.eval_batches >= 0, "eval_batches", ">= 0")
    require(config.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
    require(config.model.preset in PRESETS, "model.preset", f"one of {sorted(PRESETS)}")
    require(config.optimizer.name in OPTIMIZERS, "optimizer.name", f"one of {OPTIMIZERS}")
    require(config.optimizer.schedule in SCHEDULES, "optimizer.schedule", f"one of {SCHEDULES}")
    require(config.optimizer.eight_bit_scheme in EIGHT_BIT_SCHEMES, "optimizer.eight_bit_scheme",
            f"one of {EIGHT_BIT_SCHEMES}")
    require(config.optimizer.lr > 0, "optimizer.lr", "a positive learning rate")
    require(config.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", ">= 0")
    require(0.0 <= config.training.ema_decay < 1.0, "training.ema_decay", "a value in [0, 1)")
    require(config.training.shift > 0, "training.shift", "a positive shift")
    require(0.0 <= config.training.uniform_fraction <= 1.0, "training.uniform_fraction", "a value in [0, 1]")
    grad_accum = config.training.grad_accum
    require(isinstance(grad_accum, int) and grad_accum >= 1, "training.grad_accum", "a positive integer")
    require(config.batch_size % grad_accum == 0, "batch_size", f"a multiple of training.grad_accum={grad_accum}")
    from sana_jax.trainer.sharding import mesh_shape

    data, fsdp = mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
    micro = config.batch_size // grad_accum
    require(micro % (data * fsdp) == 0, "batch_size",
            f"a multiple of training.grad_accum x mesh devices = {grad_accum} x {data * fsdp} "
            "(the batch is split over the data and fsdp axes)")
    if config.growth is not None:
        require(config.growth.strategy in STRATEGIES, "growth.strategy", f"one of {STRATEGIES}")
        require(config.growth.target_depth >= 1, "growth.target_depth", "a positive depth")
    if config.prune is not None:
        require(config.prune.method in PRUNE_METHODS, "prune.method", f"one of {PRUNE_METHODS}")
        require(config.prune.target_depth >= 1, "prune.target_depth", "a positive depth")
    for name in ("growth", "prune"):
        stage = config[name]
        if stage is None:
            continue
        require(stage.optimizer_state in OPTIMIZER_STATES, f"{name}.optimizer_state", f"one of {OPTIMIZER_STATES}")
        if stage.optimizer_state == "carry":
            _check_carry(config, name)
    if "base" in config and config.base is not None:
        validate(config.base, num_devices=num_devices)


def _check_carry(config: ConfigDict, stage: str) -> None:
    """A carried optimizer state needs the base's final state (a base trained in this run) and the same optimizer
    (or CAME, then CAME-8bit)."""
    if config[stage].base_checkpoint:
        raise ValueError(f"config.{stage}.optimizer_state='carry' needs the base trained in this run, but "
                         f"{stage}.base_checkpoint={config[stage].base_checkpoint!r} holds weights only; "
                         "expected an empty base_checkpoint or optimizer_state='fresh'")
    base = config.base if "base" in config and config.base is not None else None
    if base is None:
        return  # _base_section reports the missing base
    names = base.optimizer.name, config.optimizer.name
    if names == ("came", "came_8bit"):  # CAME's state is stored in 8 bits on the way
        return
    for field in ("name", "eight_bit_scheme") if names == ("came_8bit", "came_8bit") else ("name",):
        if base.optimizer[field] != config.optimizer[field]:
            raise ValueError(f"config.{stage}.optimizer_state='carry': optimizer.{field}="
                             f"{config.optimizer[field]!r} differs from the base's {base.optimizer[field]!r}; "
                             "expected the same optimizer in both stages (or CAME then CAME-8bit), or "
                             "optimizer_state='fresh'")
