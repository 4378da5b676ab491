"""distil-scale: distributed knowledge-distillation pretraining (DistilBERT-style) on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="distil-scale",
    version="0.1.0",
    description="Distributed DistilBERT-style distillation pretraining on WebDataset shards and DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distil_scale", "distil_scale.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        # transformers 5.25 made the unrelated PyPI package `kernels` a hard dependency, and that package shares its
        # import name with our top-level `kernels/`: one of the two would shadow the other in every process.
        "transformers>=4.45,<5.25",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "webdataset>=0.2.100",
        "triton>=3.0",
        "safetensors",
        "xxhash",
        "pyyaml",
        "numpy",
        "pyarrow",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff==0.17.5"],
        "bench": ["liger-kernel"],
    },
    entry_points={"console_scripts": ["distil-scale=distil_scale.cli:main"]},
)
