"""Data: video I/O, manifests and TFDS datasets (of user clips or the synthetic world's films),
the latent/text cache, the Grain pipeline."""
