"""PointCLoRA: parameter-efficient fine-tuning of pre-trained point-cloud transformers."""
from . import runtime

runtime.configure()  # before anything imports torch: OpenMP reads its settings once

__version__ = "0.1.0"
