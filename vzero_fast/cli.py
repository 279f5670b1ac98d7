"""The `vzero-fast` command (also `python -m vzero_fast`, which torchrun launches).

Subcommands:
  train                    run a recipe (--recipe toy|vzero) from a preset, a TOML file and overrides
  plot RUN_DIR             draw the run's metric curves as PNG files (needs the `plot` extra)
  make-tiny DIR            write the offline tiny Qwen2.5-VL as a model directory
  generate                 sample from a model directory on one image (a smoke test of a checkpoint)
  images DIR               draw the synthetic figures of the tiny default into a folder
  config                   print a resolved config (preset < --config file < dotted overrides)

Dotted overrides (`--solver.rollout_n 10`) set any config field; `config --help-config` lists them.

Many GPUs: `torchrun --nproc_per_node=8 -m vzero_fast train ...` (vzero_fast/distributed.py). Ranks other
than 0 log warnings only (every rank with -v), each line prefixed with its rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vzero_fast import config as cfgmod

log = logging.getLogger("vzero_fast")


def _setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", 0))  # set by torchrun
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from vzero_fast.tiny import build_tiny

    path = build_tiny(args.dir, seed=args.seed)
    print(f"wrote the tiny Qwen2.5-VL to {path}")
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
        preset = "tiny"
    return cfgmod.resolve(preset, file, overrides)


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from vzero_fast import distributed
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    cfg = _train_config(args, extra)
    try:
        trainer = Trainer(cfg, resume=args.resume)
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
        print(f"run directory: {trainer.run_dir} (metrics.jsonl, checkpoints/, config.toml); "
              f"{state['global_step']} steps in {state['wall_s']:.1f} s")
    distributed.shutdown()
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from vzero_fast.metrics import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    if args.help_config:
        for key, doc in cfgmod.field_docs().items():
            print(f"--{key:<40} {doc}")
        return 0
    cfg = cfgmod.resolve(args.preset, args.config, cfgmod.parse_overrides(extra))
    print(cfgmod.dumps(cfg), end="")
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
    p.add_argument("--images", default=None, help="image folder, .jsonl or .csv (default: synthetic figures)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--max-steps-per-role", type=int, default=None, dest="max_steps_per_role")
    p.add_argument("--save-every", type=int, default=None, dest="save_every", help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=cfgmod.DEVICES)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    p = sub.add_parser("plot", help="draw the metric curves of a run as PNG files")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")

    p = sub.add_parser("make-tiny", help="write the offline tiny Qwen2.5-VL model directory")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokenizer (default 0)")

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
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"plot": _cmd_plot, "make-tiny": _cmd_make_tiny, "generate": _cmd_generate, "images": _cmd_images}[args.command](args)
    except cfgmod.ConfigError as e:
        print(f"vzero-fast: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as e:  # ModelDirError and missing image sources
        print(f"vzero-fast: {e}", file=sys.stderr)
        return 2
