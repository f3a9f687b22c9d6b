"""sdft-ray: Ray-orchestrated Self-Distillation Fine-Tuning."""

from sdft_ray.api import SDFTTrainer, TrainResult
from sdft_ray.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "SDFTTrainer", "TrainResult", "load_config"]
