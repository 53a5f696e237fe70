"""SANA 1.5's growth: a converted 1.6B checkpoint (20 blocks, first 18 kept) grown to 60 blocks (4.8B).

python -m sana_jax.train --config=configs/sana1_5_4800m.py --config.data.data_dir=/path/to/shards \
    --config.growth.base_checkpoint=/path/to/converted_sana1.5_1600m
"""

from ml_collections import ConfigDict

from sana_jax.configs import sana1_5_1600m
from sana_jax.trainer.config import growth_defaults


def get_config() -> ConfigDict:
    c = sana1_5_1600m.get_config()
    c.model.preset = "sana1.5_4800m"
    c.growth = growth_defaults()
    c.growth.target_depth = 60
    c.growth.keep = 18
    c.growth.strategy = "partial_preservation"
    c.batch_size = 32
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
