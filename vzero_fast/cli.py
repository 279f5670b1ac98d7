"""The `vzero-fast` command (also `python -m vzero_fast`, which torchrun launches).

Subcommands:
  train                    run a recipe (--recipe vzero|toy|grpo|selfjudge|opd|mmzero) from a preset, a TOML file and
                           overrides
  plot RUN_DIR             draw the run's metric curves as PNG files (needs the `plot` extra)
  make-tiny DIR            write an offline tiny model (--family qwen2_5_vl|qwen3_vl|qwen3_5) as a model directory
  generate                 sample from a model directory on one image (a smoke test of a checkpoint)
  images DIR               draw the synthetic figures of the tiny default into a folder
  eval                     accuracy (greedy, maj@k, pass@k) of checkpoints side by side on a benchmark
  bench NAME               kernels | step | rollout | sync | opd | render: a table and a JSON line, baselines in the
                           same run
  config                   print a resolved config (preset < --config file < dotted overrides)
  export --merge ADAPTER --out DIR
                           merge a LoRA adapter directory into its base: an HF checkpoint (vzero_fast/lora.py)

Dotted overrides (`--solver.rollout_n 10`) set any config field; `config --help-config` lists them.

Many GPUs: `torchrun --nproc_per_node=8 -m vzero_fast train ...` (vzero_fast/distributed.py). Ranks other
than 0 log warnings only (every rank with -v), each line prefixed with its rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from vzero_fast import config as cfgmod

log = logging.getLogger("vzero_fast")


def _setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", 0))  # set by torchrun
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if not sys.stderr.isatty():  # transformers' "Loading weights" bars: noise in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from vzero_fast.model import family
    from vzero_fast.tiny import build_tiny

    path = build_tiny(args.dir, seed=args.seed, family=args.family)
    print(f"wrote the tiny {family(args.family).name} to {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from vzero_fast.data import synthetic_figure
    from vzero_fast.model import generate, load_policy

    policy = load_policy(args.model, dtype=args.dtype, device=args.device)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = synthetic_figure(args.seed, size=112)
    texts = generate(policy, [image], [args.prompt], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, seed=args.seed)
    for text in texts:
        print(text)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from vzero_fast.data import write_synthetic_images

    paths = write_synthetic_images(args.dir, count=args.count, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} synthetic figures to {args.dir}")
    return 0


# Flags that are shortcuts for config fields (a flag given on the command line wins over the file).
TRAIN_FLAGS = {"recipe": "train.recipe", "out": "train.out", "iterations": "train.iterations",
               "max_steps_per_role": "train.max_steps_per_role", "save_every": "train.save_every",
               "seed": "train.seed", "model": "model.path", "images": "data.images", "device": "train.device"}


# Presets for a --model given without --preset / --config, by the text model's hidden size.
PRESET_BY_HIDDEN = {2048: "vzero-3b", 3584: "vzero-7b"}
TINY_HIDDEN_MAX = 512  # `vzero-fast make-tiny` models (hidden 64) train with the tiny preset


def preset_for_model(model_dir: str | Path) -> str:
    """The preset that fits a model directory (Qwen2.5-VL-3B -> vzero-3b, 7B -> vzero-7b, tiny -> tiny)."""
    from vzero_fast.model import ModelDirError, check_model_dir

    try:
        path = check_model_dir(model_dir)
    except ModelDirError as e:
        raise cfgmod.ConfigError(_naming("--model", str(model_dir), e)) from None
    config = json.loads((path / "config.json").read_text())
    hidden = config.get("text_config", {}).get("hidden_size") or config.get("hidden_size")
    if isinstance(hidden, int) and hidden <= TINY_HIDDEN_MAX:
        return "tiny"
    if hidden in PRESET_BY_HIDDEN:
        return PRESET_BY_HIDDEN[hidden]
    raise cfgmod.ConfigError(f"--model {model_dir}: no preset fits a model of hidden size {hidden} (presets: "
                             f"{', '.join(sorted(cfgmod.PRESETS))}); give --preset or --config")


def _train_config(args: argparse.Namespace, extra: list[str]) -> cfgmod.Config:
    overrides = cfgmod.parse_overrides(extra)
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            section, name = key.split(".")
            overrides.setdefault(section, {})[name] = value
    preset, file = args.preset, args.config
    if args.resume and preset is None and file is None:
        # --resume alone continues the run with the config it saved (flags and overrides still win).
        out = overrides.get("train", {}).get("out")
        if out is None:
            raise cfgmod.ConfigError("--resume needs --out RUN_DIR (or --config/--preset)")
        file = Path(out) / "config.toml"
        if not file.exists():
            raise cfgmod.ConfigError(f"--resume: {file} does not exist (is {out} a run directory?)")
    if preset is None and file is None:
        preset = preset_for_model(args.model) if args.model else "tiny"
        if args.recipe == "mmzero" and preset == "vzero-7b":  # V-Zero's settings would leave MM-Zero's roles at defaults
            preset = "mmzero-7b"
        if args.model:
            log.info("--model %s: using the %s preset (--preset to choose another)", args.model, preset)
    return cfgmod.resolve(preset, file, overrides)


def preflight(cfg: cfgmod.Config) -> None:
    """Catch the user's mistakes before anything is built or written: the device, the rollout backend, the
    model directory and the images. Each raises ConfigError with one line naming the flag, the value and what is allowed."""
    import torch

    from vzero_fast.data import open_images
    from vzero_fast.model import ModelDirError, check_model_dir

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("--device cuda: no CUDA device is available here (allowed: auto, cpu, cuda "
                                 "where a GPU is visible)")
    from vzero_fast.tracking import unavailable

    reason = unavailable(cfg.train.report_to)
    if reason is not None:
        raise cfgmod.ConfigError(reason)
    if cfg.rollout.backend == "vllm":
        from vzero_fast.rollout_vllm import vllm_unavailable

        reason = vllm_unavailable()
        if reason is not None:
            raise cfgmod.ConfigError(f"--rollout.backend vllm: {reason} (install it: pip install -e \".[vllm]\" on CUDA, "
                                     "scripts/vllm_cpu_env.sh on a CPU; or use --rollout.backend native or auto)")
    if cfg.model.path:
        try:
            check_model_dir(cfg.model.path)
        except ModelDirError as e:
            raise cfgmod.ConfigError(_naming("--model", cfg.model.path, e)) from None
    if cfg.train.recipe == "opd" and cfg.opd.teacher:
        try:
            check_model_dir(cfg.opd.teacher)
        except ModelDirError as e:
            raise cfgmod.ConfigError(_naming("--opd.teacher", cfg.opd.teacher, e)) from None
    if cfg.train.recipe == "mmzero" and cfg.data.images:
        raise cfgmod.ConfigError("--images: the mmzero recipe starts from no images at all (its Coder draws them); "
                                 "drop --images")
    if cfg.data.images:
        try:
            if cfg.train.recipe == "opd":  # rows of image + question + bbox
                from vzero_fast.regions import open_regions

                open_regions(cfg.data, seed=cfg.train.seed, negative=cfg.opd.negative)
            elif cfg.train.recipe in ("grpo", "selfjudge"):  # rows of image + question (+ answer)
                from vzero_fast.qa import open_qa

                open_qa(cfg.data, seed=cfg.train.seed, task="figures",
                        require_answer=cfg.train.recipe == "grpo" and cfg.grpo.mode == "label")
            else:
                open_images(cfg.data, seed=cfg.train.seed, quiet=True)
        except (ValueError, OSError) as e:
            raise cfgmod.ConfigError(_naming("--images", cfg.data.images, e)) from None


def _naming(flag: str, value: str, error: Exception) -> str:
    """`flag value: message`, without repeating the value when the message already names it."""
    text = str(error)
    return f"{flag}: {text}" if value in text else f"{flag} {value}: {text}"


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from vzero_fast import distributed
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    if args.resume and args.overwrite:
        raise cfgmod.ConfigError("--resume continues the run in --out and --overwrite replaces it: give one")
    started = time.perf_counter()
    cfg = _train_config(args, extra)
    preflight(cfg)
    try:
        with logging_redirect_tqdm():  # log lines print above a terminal's progress bar, not through it
            trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, started=started)
            recipe = build_recipe(cfg.train.recipe, trainer)
            state = trainer.run(recipe)
    except RuntimeError as e:  # what a failed collective raises (DistBackendError included)
        if not distributed.is_distributed():
            raise
        # A collective that failed almost always means another rank died (its own log says why) or stalled
        # past dist.timeout_s; say so in one line, then exit non-zero (torchrun reports the failure).
        log.error("rank %d of %d stops: %s: %s -- if another rank died or hung, its log above has the cause "
                  "(collectives wait at most dist.timeout_s = %.0f s)", distributed.rank(),
                  distributed.world_size(), type(e).__name__, str(e).strip().splitlines()[0] if str(e) else "",
                  cfg.dist.timeout_s)
        raise
    if distributed.is_main():
        _print_summary(trainer.run_dir, trainer.summary)
    distributed.shutdown()
    # The shell's convention for a run a signal ended: 130 after SIGINT, 143 after SIGTERM. A torchrun rank
    # ends here without interpreter finalization (distributed.end_process says why).
    return distributed.end_process(128 + signal.Signals[state["stopped"]] if state["stopped"] else 0)


def _print_summary(run_dir: Path, s: dict) -> None:
    """The end-of-run summary on stdout (run_summary.json holds the same)."""
    lines = [f"run {s['status']}: {run_dir} ({s['wall_s']:.1f} s wall-clock, set-up included)",
             "  steps: " + (", ".join(f"{role} {n}" for role, n in s["steps"].items()) or "none")
             + f" ({s['global_step']} in all)"]
    im = s["images"]
    if im:
        reasons = ", ".join(f"{n} {r}" for r, n in im["skipped_by_reason"].items())
        unread = f", {im['not_read']} not read" if im["not_read"] else ""
        lines.append(f"  images: {im['source']}: {im['candidates']} files, {im['loaded']} loaded, {im['skipped']} "
                     f"skipped{f' ({reasons})' if reasons else ''}{unread}")
    lines.append(f"  checkpoints: {len(s['checkpoints_written'])} written by this process; latest "
                 f"{s['latest_checkpoint'] or 'none'}")
    lines.append(f"  outputs: metrics.jsonl, run_summary.json, config.toml, checkpoints/ (curves: vzero-fast plot "
                 f"{run_dir})")
    if s["resume_command"]:
        lines.append(f"  continue with: {s['resume_command']}")
    print("\n".join(lines), flush=True)


def _cmd_plot(args: argparse.Namespace) -> int:
    from vzero_fast.metrics import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vzero_fast.evaluate import run_eval

    return run_eval(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from vzero_fast.lora import export_merged

    out = export_merged(args.merge, args.out, base=args.base or None)
    print(f"merged {args.merge} into its base -> {out}")
    return 0


def _cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    if args.help_config:
        for key, doc in cfgmod.field_docs().items():
            print(f"--{key:<40} {doc}")
        return 0
    cfg = cfgmod.resolve(args.preset, args.config, cfgmod.parse_overrides(extra))
    print(cfgmod.dumps(cfg), end="")
    return 0


BENCHES = {"kernels": ("bench_kernels.py", []), "step": ("bench_step.py", []),
           "rollout": ("bench_rollout.py", ["--what", "rollout"]), "sync": ("bench_rollout.py", ["--what", "sync"]),
           "opd": ("bench_opd.py", []), "render": ("bench_render.py", [])}
"""`vzero-fast bench NAME` -> (script under benchmarks/, arguments put first)."""


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    """Run a benchmark script's `main` in this process; it prints its table and, last, one JSON line."""
    import importlib.util

    script, first = BENCHES[args.what]
    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    if not path.is_file():
        raise FileNotFoundError(f"vzero-fast bench runs the repository's benchmarks/ ({path} is missing): use a "
                                "checkout with an editable install (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"vzero_bench_{args.what}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main([*first, *extra])
    except SystemExit as e:  # the benchmark's own one-line refusal (e.g. bench sync without vLLM) or --help
        if isinstance(e.code, str):
            print(f"vzero-fast: {e.code}", file=sys.stderr)
            return 2
        return e.code or 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vzero-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe; any config field can be set as --section.key VALUE")
    p.add_argument("--recipe", default=None, choices=cfgmod.RECIPES, help="recipe (default: the config's)")
    p.add_argument("--preset", default=None, choices=sorted(cfgmod.PRESETS),
                   help="starting hyperparameters (default tiny, unless --config or --resume)")
    p.add_argument("--config", default=None, help="TOML file (over the preset)")
    p.add_argument("--out", default=None, help="run directory")
    p.add_argument("--model", default=None, help="local model directory (default: build the tiny model)")
    p.add_argument("--images", default=None, help="image folder, .jsonl or .csv (default: synthetic figures); "
                   "grpo/selfjudge: a .jsonl or .csv of image + question (+ answer) rows")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--max-steps-per-role", type=int, default=None, dest="max_steps_per_role")
    p.add_argument("--save-every", type=int, default=None, dest="save_every", help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=cfgmod.DEVICES)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start a new run there")

    p = sub.add_parser("plot", help="draw the metric curves of a run as PNG files")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")

    p = sub.add_parser("make-tiny", help="write an offline tiny model directory (Qwen2.5-VL, Qwen3-VL or Qwen3.5)")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokenizer (default 0)")
    p.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen3_vl", "qwen3_5"),
                   help="architecture (config.json model_type; default qwen2_5_vl)")

    p = sub.add_parser("generate", help="sample from a model directory on one image")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--image", default="", help="image file (default: a synthetic figure)")
    p.add_argument("--prompt", default="Describe the figure.", help="user text")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=cfgmod.DTYPES)
    p.add_argument("--device", default="auto", choices=cfgmod.DEVICES)

    p = sub.add_parser("images", help="draw the synthetic figures into a folder")
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="accuracy of checkpoints side by side on a benchmark (vzero_fast/evaluate.py)")
    p.add_argument("--model", nargs="+", required=True, metavar="[NAME=]DIR", help="model directories (base, iter-1, ...)")
    p.add_argument("--bench", required=True, help="a .jsonl, a VLMEvalKit .tsv, or 'synthetic' (built-in, with truth)")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--k", type=int, default=4, help="samples at T=1 per item for maj@k and pass@k (0 = greedy only)")
    p.add_argument("--backend", default="native", choices=("native", "vllm", "auto"), help="rollout engine")
    p.add_argument("--limit", type=int, default=None, help="first N usable items only")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest response (default 1024)")
    p.add_argument("--batch", type=int, default=32, help="items per engine call (default 32)")
    p.add_argument("--synthetic-size", type=int, default=224, help="side in px of the synthetic items")
    p.add_argument("--dtype", default="auto", choices=cfgmod.DTYPES)
    p.add_argument("--device", default="auto", choices=cfgmod.DEVICES)

    p = sub.add_parser("bench", help="a benchmark with its baselines measured in the same run: a table, then one "
                       "JSON line (needs the repository's benchmarks/ folder)",
                       description="kernels: fused log-prob / GRPO loss / vote counting vs naive references; step: "
                       "one GRPO step's breakdown and native rollout vs transformers.generate; rollout: native "
                       "engine vs generate (and vLLM where it imports); sync: vLLM in-place weight sync vs a plain "
                       "copy. Options after the name go to the benchmark (e.g. --smoke, --out FILE.json; "
                       "`vzero-fast bench NAME --help`).")
    p.add_argument("what", choices=tuple(BENCHES), help="which benchmark")

    p = sub.add_parser("export", help="merge a LoRA adapter (checkpoints/<role>/...) into its base as an HF checkpoint")
    p.add_argument("--merge", required=True, metavar="ADAPTER", help="adapter directory (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--base", default="", help="base model directory (default: the adapter's base_model_name_or_path)")

    p = sub.add_parser("config", help="print a resolved config")
    p.add_argument("--preset", default=None, choices=sorted(cfgmod.PRESETS))
    p.add_argument("--config", default=None, help="TOML file")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "config":
            return _cmd_config(args, extra)
        if args.command == "train":
            return _cmd_train(args, extra)
        if args.command == "bench":
            return _cmd_bench(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"plot": _cmd_plot, "make-tiny": _cmd_make_tiny, "generate": _cmd_generate, "images": _cmd_images,
                "eval": _cmd_eval, "export": _cmd_export}[args.command](args)
    except BrokenPipeError:  # `vzero-fast config --help-config | head`: the reader has gone; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail
        return 0
    except cfgmod.ConfigError as e:
        print(f"vzero-fast: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, FileExistsError) as e:  # ModelDirError, missing images, busy --out
        print(f"vzero-fast: {e}", file=sys.stderr)
        return 2
