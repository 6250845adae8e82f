"""Video autoencoders: Wan VAE 2.1 / 2.2 and the tiny config's analytic DCT autoencoder."""
