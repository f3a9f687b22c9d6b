"""The Python API, in the shape of TRL's ``trl.experimental.sdft.SDFTTrainer``, on the same entry point as
``sdft-ray train`` and ``ray job submit`` (``driver.train``).

    from sdft_ray import SDFTTrainer, load_config
    args = load_config("configs/qwen0.5b.yaml", ["train.steps=20"])
    trainer = SDFTTrainer(model="models/qwen", args=args, train_dataset=dataset)
    result = trainer.train()          # result.summary, result.model_path
    trainer.save_model("my-model")

``train_dataset`` is a ``datasets.Dataset``, a list of dicts, or a path; its records are any format
``sdft_ray/data.py`` reads (TRL's ``prompt`` + ``teacher_prompt``, ``prompt`` + ``golden_response``, ...).
An in-memory dataset is written to ``<output_dir>/train_dataset.jsonl`` first: the run's copy of what it
trained on, and what a resume reads again.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_ray.config import Config, resolve_rollout_backend


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model_path: str  # the final student (HF folder: config, safetensors, tokenizer)


class SDFTTrainer:
    def __init__(
        self,
        model: str | None = None,
        ref_model: str | None = None,
        args: Config | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
    ) -> None:
        """``model``: the student's folder (else ``args.model.path``). ``ref_model``: a teacher model other than the
        student (``teacher.model_path``; another size needs ``teacher.kind=frozen``). ``processing_class``: a
        tokenizer folder, or a tokenizer loaded from one (its ``name_or_path`` is used)."""
        self.cfg = copy.deepcopy(args) if args is not None else Config()
        if model:
            self.cfg.model.path = str(model)
        if ref_model:
            self.cfg.teacher.model_path = str(ref_model)
        if processing_class is not None:
            self.cfg.model.tokenizer = str(getattr(processing_class, "name_or_path", processing_class))
        self.train_dataset = train_dataset
        self.result: TrainResult | None = None

    def _dataset_file(self) -> str:
        ds = self.train_dataset
        if ds is None:
            return self.cfg.data.train
        if isinstance(ds, (str, Path)):
            return str(ds)
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "train_dataset.jsonl"
        with open(path, "w") as f:
            for rec in ds:  # a datasets.Dataset iterates as dicts, as a list of dicts does
                f.write(json.dumps(dict(rec)) + "\n")
        return str(path)

    def train(self) -> TrainResult:
        from sdft_ray import checkpoint as ckpt
        from sdft_ray.driver import train

        self.cfg.data.train = self._dataset_file()
        self.cfg.rollout.backend = resolve_rollout_backend(self.cfg)
        self.cfg.check()  # what load_config checks, again: the fields set here are part of it
        summary = train(self.cfg)
        last = ckpt.complete_checkpoints(self.cfg.train.output_dir)[-1]
        self.result = TrainResult(summary, str(last / "student"))
        return self.result

    def save_model(self, output_dir: str) -> str:
        """Copy the final student (weights, config, tokenizer) to ``output_dir``."""
        if self.result is None:
            raise RuntimeError("save_model() comes after train()")
        shutil.copytree(self.result.model_path, output_dir, dirs_exist_ok=True)
        return output_dir
