"""A small SANA DiT on the built-in shapes domain: a few minutes on two CPU cores.

python -m sana_jax.train --config=configs/pretrain.py
"""

from ml_collections import ConfigDict

from sana_jax.trainer.config import default_config


def get_config() -> ConfigDict:
    c = default_config()
    c.steps = 400
    c.batch_size = 16
    c.log_every = 20
    c.checkpoint_every = 100
    c.sample_every = 200
    # 4 SANA 1.5 blocks of width 64 (2 heads x 32); channels follow the data (8x8x48 latents, 64-d text).
    c.model.preset = "tiny"
    c.model.overrides = {"depth": 4, "num_heads": 2, "head_dim": 32, "cross_num_heads": 2, "cross_head_dim": 32}
    c.data.resolution = 32
    c.optimizer.name = "came"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 40
    c.training.shift = 1.0
    c.sampling.num_prompts = 32
    return c
