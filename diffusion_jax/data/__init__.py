"""Training data: sources (bundled Fashion-MNIST, image folder, tfds, precomputed latents) in
`sources`, the grain pipeline in `pipeline`, the latent precompute pass in `precompute`.
Import the submodules; this package imports nothing so `data.fashion_mnist` stays light."""
