"""Tools around the runtime, not part of a training step: models and tasks from PyPI wheels (``pretrained``,
``tasks``, ``testbed``, ``demos``), memory estimates (``memory_budget``, ``loss_memory``), the bench, and the
experiments (``continual``, ``experiment``, ``experiment_v3``)."""
