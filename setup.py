"""rebalance_jax: structure-aware distillation for vision-language retrieval, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="rebalance_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of 'Rebalanced Vision-Language Retrieval Considering "
                "Structure-Aware Distillation' (Yang et al., IEEE TIP 2024)",
    packages=find_packages(include=["rebalance_jax", "rebalance_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml_collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",  # the prepared datasets' file format (data/prepared.py)
        "importlib_resources>=7.1.0",  # TFDS builders need it and do not declare it
        "grain>=0.2.18,<0.3",  # the input pipeline (data/pipeline.py)
        "safetensors>=0.8.0",  # converted weights (weights.py)
        # 4.57.x is the last transformers with Flax code; used for tokenizers and weight reading.
        "transformers>=4.57.6,<4.58",
        "tokenizers>=0.22.2,<0.23",
        "huggingface_hub>=0.36.2,<1.0",
        "numpy>=2.0",
        "pillow>=12.0",
        "absl-py>=2.0",
        "tensorboardX>=2.6.5",
        "matplotlib>=3.10",
        "scipy>=1.13",  # the ablation report's paired t-tests (jax depends on it too)
    ],
    # convert: reading PyTorch pickles (Swin releases, pytorch_model.bin, the reference's trained
    # checkpoints); only `rebalance_jax.convert` imports torch. 2.13.0 is a CPU build on these
    # machines (a looser pin pulls a multi-GB CUDA build).
    # test: rouge-score is the reference ROUGE-L the tests compare against; torch runs the parity
    # tests against transformers' PyTorch models. The real MiniLM checkpoint the tests convert is
    # installed beside, with --no-deps (README, "Quick start"). import-linter checks the layers
    # of setup.cfg (tests/test_layers.py), ruff the code (ruff.toml, tests/test_lint.py);
    # pytest-timeout fails a hanging test instead of the whole run, pytest-xdist runs the test
    # files on two workers (setup.cfg).
    extras_require={"convert": ["torch==2.13.0"],
                    "test": ["pytest>=9.0", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0",
                             "rouge-score==0.1.2", "torch==2.13.0", "import-linter==2.16",
                             "ruff==0.17.5"]},
)
