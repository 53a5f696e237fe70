"""SANA 1.5 1.6B fine-tuning from cached latents and Gemma-2 features (SANA's published recipe).

Data: ArrayRecord shards written by tools/prepare_data.py with DC-AE f32c32 latents and Gemma-2 features.
python -m sana_jax.train --config=configs/sana1_5_1600m.py --config.data.data_dir=/path/to/shards \
    --config.init_checkpoint=/path/to/converted_sana1.5_1600m
"""

from ml_collections import ConfigDict

from sana_jax.trainer.config import default_config


def get_config() -> ConfigDict:
    c = default_config()
    c.steps = 10_000
    c.batch_size = 64
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_every = 2_500
    c.sample_every = 0
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.model.preset = "sana1.5_1600m"
    c.data = ConfigDict({"source": "array_record", "data_dir": "", "caption_dropout": 0.1, "num_threads": 8})
    # SANA 1.5: lr 2e-5 constant after 2000 warmup steps, clip 0.1, no weight decay, CAME-8bit.
    c.optimizer.name = "came_8bit"
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = 2000
    c.optimizer.clip_grad_norm = 0.1
    c.training.shift = 3.0
    c.training.compute_dtype = "bfloat16"
    c.training.remat = "full"
    c.sampling.num_prompts = 0  # the shapes checker does not apply to real captions
    return c
