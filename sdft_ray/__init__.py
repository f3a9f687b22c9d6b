"""sdft-ray: Ray-orchestrated Self-Distillation Fine-Tuning."""

__version__ = "0.1.0"
