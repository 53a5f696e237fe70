"""Data for training and evaluation.

The shapes domain's latent spaces and text encoder live beside DC-AE and Gemma-2, in
`sana_jax.autoencoder.patch` and `sana_jax.text_encoder.word`.

Modules (import the one you need; the package itself imports nothing heavy):
  shapes        the built-in compositional shapes domain: prompt grammar and renderer;
  checker       judges whether an image satisfies a shapes prompt;
  images        image loading, centre crop and resize;
  records       ArrayRecord shards of cached latents and text features;
  prepare       image-caption collections -> records (driven by tools/prepare_data.py);
  pipeline      grain pipelines and `make_train_iterator` for the trainer;
  tfds_shapes   the shapes domain as a TFDS builder (needs tensorflow-datasets).
"""
