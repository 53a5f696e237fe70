"""SANA 1.5's model growth, end to end on the built-in shapes domain (the project's main job).

Stage "base": the pretrain config's 4-block model (resumed when <workdir>/base has a checkpoint). Stage
"grow": partial preservation to 12 blocks (new blocks start as exact identities), then training with CAME-8bit
from the base's CAME state.

python -m sana_jax.train --config=configs/grow.py
For a converted SANA 1.6B checkpoint grown to 60 blocks (keeping 18), see configs/sana1_5_4800m.py.
"""

from ml_collections import ConfigDict

from sana_jax.configs import pretrain
from sana_jax.trainer.config import growth_defaults


def get_config() -> ConfigDict:
    c = pretrain.get_config()
    c.base = pretrain.get_config()
    # The base trains for as many steps (at most 6000) as the machine runs while the whole command stays within
    # ten minutes on two cores, so that a faster machine buys a better model: its budget of 560 s keeps 500 steps'
    # worth at its own pace for the change of stage, the grown stage and the final grid, which took as long as
    # 467-566 base steps on every host and load measured (docs/shapes_model.md: 2610-3400 steps and 9 min 16-25 s
    # on a fast host; 1710 steps and 9 min 33 s with one of its cores busy; with the CPU kernels of
    # docs/performance.md the fast host reached the former cap of 4000 in 6.5 minutes). The step reached is in
    # base/model and the log; --config.base.steps=N --config.base.time_budget_s=0 repeats it.
    c.base.steps = 6000
    c.base.time_budget_s = 560.0
    c.base.time_reserve_steps = 500
    c.growth = growth_defaults()
    c.growth.target_depth = 12
    c.growth.strategy = "partial_preservation"
    # The grown stage continues from the base's CAME state (restacked to 12 blocks, its first moments stored in
    # 8 bits): a fresh state first undoes part of the base (docs/growth.md).
    c.growth.optimizer_state = "carry"
    # A 12-block step costs 2.8x a 4-block one and the base gains fastest per second: most of the ten minutes go
    # to the base. In 50-100 steps the fresh blocks stay close to identities; what the grown stage gains there is
    # the lower learning rate's, as much as the base continued without growing gains (docs/growth.md).
    c.steps = 50
    # The 12-block step takes its batch whole: as two halves it compiles 13-26 s longer than 50 steps gain.
    c.model.overrides.batch_splits = 1
    c.sample_every = 0
    c.eval_every = 50
    c.optimizer.name = "came_8bit"
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 20
    return c
