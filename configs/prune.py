"""Depth pruning by block importance, then a short fine-tune (SANA 1.5's pruning, in miniature).

The base is the grown 12-block model of configs/grow.py (`prune.base_checkpoint`, default
workdir/grow/model) or, when that is absent, a base trained first in <workdir>/base. Block importance
(1 - cosine of each block's input and output) on calibration batches picks the blocks to keep.

python -m sana_jax.train --config=configs/prune.py
"""

import os

from ml_collections import ConfigDict

from sana_jax.configs import pretrain
from sana_jax.trainer.config import prune_defaults


def get_config() -> ConfigDict:
    c = pretrain.get_config()
    c.base = pretrain.get_config()
    c.prune = prune_defaults()
    c.prune.target_depth = 6
    c.prune.method = "importance"
    grown = os.path.join("workdir", "grow", "model")
    c.prune.base_checkpoint = grown if os.path.isdir(grown) else ""
    c.steps = 100
    c.sample_every = 0
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    return c
