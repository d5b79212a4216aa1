"""PointCLoRA: parameter-efficient fine-tuning of pre-trained point-cloud transformers."""
from . import runtime

runtime.configure()  # before anything imports torch: OpenMP reads its settings once

__version__ = "0.1.0"

# Every backbone registers itself, and the adapter defaults of classes it cannot edit (timm's
# VisionTransformer), on any import of the package: `from pointclora.adapters import
# apply_adapter` then works on a stock timm model.
from . import models  # noqa: E402,F401
