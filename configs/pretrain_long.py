"""The base recipe of configs/pretrain.py for 9000 steps (about 40 minutes on two idle CPU cores).

python -m sana_jax.train --config=configs/pretrain_long.py
"""

from ml_collections import ConfigDict

from sana_jax.configs import pretrain


def get_config() -> ConfigDict:
    c = pretrain.get_config()
    c.steps = 9000
    c.checkpoint_every = 1000
    c.sample_every = 1500
    c.eval_every = 1000
    return c
