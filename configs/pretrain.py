"""A small SANA DiT on the built-in shapes domain: a few minutes on two CPU cores.

python -m sana_jax.train --config=configs/pretrain.py
"""

from ml_collections import ConfigDict

from sana_jax.trainer.config import default_config


def get_config() -> ConfigDict:
    c = default_config()
    # 2700 steps: 6-8 minutes on two idle cores. The main job (configs/grow.py) runs this stage for a time budget.
    c.steps = 2700
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 1000
    c.eval_every = 250
    # Ten steps per compiled call: on CPU each call maps and zeroes 235 MB of XLA scratch memory afresh, an eighth
    # of the step's CPU time when every step is its own call (docs/performance.md).
    c.steps_per_call = 10
    # 4 SANA 1.5 blocks of width 64 (2 heads x 32); channels follow the data (8x8x16 latents, 64-d text).
    # The caption norm starts at 1 rather than SANA's 0.01 (with 0.01 a run this short learns to ignore
    # the text: the norm's weight shrinks to 0.003); on CPU the unrolled block loop is 2x faster, and two
    # halves of the batch as independent computations 1.15x (docs/performance.md).
    c.model.preset = "tiny"
    c.model.overrides = {"depth": 4, "num_heads": 2, "head_dim": 32, "cross_num_heads": 2, "cross_head_dim": 32,
                         "caption_norm_init": 1.0, "unroll_blocks": True, "batch_splits": 2}
    c.data.resolution = 32
    # The domain's flat shapes live in a few principal components of each 4x4 patch: 16 of the 48
    # space-to-depth channels (docs/shapes_model.md: clean shapes instead of speckle, 2x the accuracy).
    c.data.latent = "patch_pca"
    c.data.latent_channels = 16
    # A fifth of SANA's 0.1 of captions dropped: in runs this short every conditional sample counts, and 2 %
    # still train the null caption enough for guidance (three seeds: GenEval-lite 0.52 with 0.1, 0.56 with 0.05,
    # 0.58 with 0.02 at guidance 1.5; docs/shapes_model.md).
    c.data.caption_dropout = 0.02
    c.optimizer.name = "came"
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    # In 8x8x48 latents an object's colour is still readable at sigma 0.8-0.9, so the caption only matters
    # above that: shift 6 puts training there (docs/shapes_model.md), and a fifth of the batch at uniform
    # sigma keeps the low-noise end, where edges are drawn, in training.
    c.training.shift = 6.0
    c.training.uniform_fraction = 0.2
    c.sampling.num_prompts = 120  # 20 per task
    c.sampling.shift = 6.0
    # 1.25 rather than 1.5: single objects +0.035 to +0.09 on six models (two dropouts, three seeds), overall level.
    c.sampling.guidance_scale = 1.25
    # 10 Flow-DPM-Solver steps score as 20 do on the trained models, at half the sampling time (docs/shapes_model.md).
    c.sampling.num_steps = 10
    return c
