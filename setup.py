from setuptools import find_packages, setup

setup(
    name="coreg_dist",
    version="0.1.0",
    description="Label images with a vision-language model, then learn a classifier from the noisy "
                "candidate sets with Co-Reg.",
    python_requires=">=3.10",
    packages=find_packages(include=["coreg_dist", "coreg_dist.*", "annotate", "annotate.*",
                                    "train", "train.*"]),
    install_requires=[
        # A range, so that a GPU machine keeps the CUDA build it has; the README's set-up and
        # .ci/run install torch==2.13.0 (CPU wheel) first on CPU machines.
        "torch>=2.4,<2.16",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "webdataset>=0.2.86,<2",
        "transformers>=4.40",
        "safetensors",
        "pillow>=10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "openai>=1.40",           # the VLM annotator's client (annotate/vlm_client.py)
        "pyarrow>=14",            # coreg-annotate import reads parquet files (annotate/importer.py)
    ],
    extras_require={
        # Launch paths beyond torchrun (coreg_dist/engines/): dist.engine=deepspeed, accelerate launch.
        "deepspeed": ["deepspeed>=0.16,<0.20"],
        "accelerate": ["accelerate>=1.0,<2"],
        # The tests run every launch path.
        "test": ["pytest>=7", "deepspeed>=0.16,<0.20", "accelerate>=1.0,<2"],
    },
    entry_points={"console_scripts": [
        "coreg-data=coreg_dist.data_cli:main",
        "coreg-annotate=annotate.cli:main",
        "coreg-train=train.cli:main",
        "coreg-pipeline=train.pipeline:main",
    ]},
)
