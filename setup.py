"""PointCLoRA: parameter-efficient fine-tuning of pre-trained point-cloud transformers."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="pointclora",
    version="0.1.0",
    description=(
        "Parameter-efficient fine-tuning (CLoRA, Serial LoRA, AOFT, LoRA) of Point-MAE and "
        "Point-BERT, with our own FPS/kNN ops on CPU and GPU."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["pointclora", "pointclora.*"]),
    # The C++/CUDA sources are compiled on first use (torch.utils.cpp_extension), so they ship
    # as package data rather than as a build-time extension.
    package_data={"pointclora.ops": ["csrc/*/*.cpp", "csrc/*/*.cu", "csrc/*/*.h"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",  # timm imports it
        "timm>=0.9",
        "safetensors",  # timm weight files (timm needs it too)
        "fvcore>=0.1.5",
        "h5py>=3.0",
        "numpy>=1.22",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
        "pillow",  # image datasets read their files with it
        "open3d>=0.17",
        "ninja",  # torch.utils.cpp_extension builds the point ops with it
    ],
    extras_require={
        # pointnet2_ops is not on PyPI: used for FPS only when asked for, never required.
        # peft: the reference our LoRA is tested and benchmarked against on timm ViTs
        "dev": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.4", "peft>=0.10"],
        "bench": ["fpsample>=0.3", "peft>=0.10"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
