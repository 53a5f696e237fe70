"""Data for training and evaluation.

Modules (import the one you need; the package itself imports nothing heavy):
  shapes        the built-in compositional shapes domain: prompt grammar and renderer;
  checker       judges whether an image satisfies a shapes prompt;
  autoencoder   the autoencoder interface and the exact space-to-depth latent space;
  text_encoder  the text encoder interface and the word-level encoder of the shapes domain;
  images        image loading, centre crop and resize;
  records       ArrayRecord shards of cached latents and text features;
  prepare       image-caption collections -> records (driven by tools/prepare_data.py);
  pipeline      grain pipelines and `make_train_iterator` for the trainer;
  tfds_shapes   the shapes domain as a TFDS builder (needs tensorflow-datasets).
"""
