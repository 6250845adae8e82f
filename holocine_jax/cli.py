"""`holocine-jax` command line: demo | import | export | data.

Every command takes `--config NAME|PATH` and `--config.key=value` overrides, and prints a
one-line summary of what it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from holocine_jax.config import apply_override, load_config


def cmd_import(args, overrides) -> str:
    import jax
    from flax import nnx

    from holocine_jax.checkpoint import save_params
    from holocine_jax.convert import load_diffusers, load_official

    config = load_config(args.config, overrides)
    load = load_diffusers if args.format == "diffusers" else load_official
    model = load(args.src, config, expert=args.expert)  # validates every tensor before writing
    save_params(model, args.out)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return f"imported {args.format} weights from {args.src} ({n / 1e6:.1f}M parameters) into {args.out}"


def cmd_export(args, overrides) -> str:
    from holocine_jax.checkpoint import load_config_json, load_params
    from holocine_jax.convert import save_diffusers, save_official

    config = load_config_json(args.checkpoint)
    for item in overrides:  # the architecture comes from the checkpoint; overrides adjust the rest
        apply_override(config, item)
    model = load_params(args.checkpoint, config)
    save = save_diffusers if args.format == "diffusers" else save_official
    out = save(model, args.out, expert=args.expert, dtype=args.dtype)
    return f"exported {args.checkpoint} as {args.format} safetensors to {out}"


def cmd_demo(args, overrides) -> str:
    from holocine_jax.smoke import fit_random_batch

    config = load_config(args.config, overrides)
    print("demo: the training issue has not landed yet, so this fits the tiny Wan DiT to one "
          "random batch (jitted forward + backward + AdamW) instead of the synthetic world.")
    start = time.perf_counter()
    history = fit_random_batch(config, steps=args.steps)
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "demo_metrics.json")
    with open(path, "w") as f:
        json.dump({"config": config.name, "history": history,
                   "seconds": time.perf_counter() - start}, f, indent=2)
    first, last = history[0], history[-1]
    return (f"demo: loss {first['loss']:.4f} -> {last['loss']:.4f} over {len(history)} steps "
            f"({time.perf_counter() - start:.1f}s); metrics in {path}")


def cmd_data(args, overrides) -> str:
    from holocine_jax.data.dataset import build_dataset, write_synthetic_dataset

    config = load_config(args.config, overrides)
    if args.data_command == "synthetic":
        report = write_synthetic_dataset(args.out, args.num_films, args.seed, config)
    else:
        report = build_dataset(args.manifest, args.out, config, strict=args.strict)
    skipped = sum(report["skipped"].values())
    return (f"built {report['examples']} examples, skipped {skipped} "
            f"{dict(report['skipped']) if skipped else ''}-> {report['data_dir']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holocine-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help, default_config="tiny"):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=default_config, help="config name or path (configs/)")
        p.set_defaults(fn=fn)
        return p

    p = command("demo", cmd_demo, "run the main job on the embedded default (tiny, CPU)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=30)

    p = command("import", cmd_import, "import diffusers / official Wan weights into a checkpoint",
                default_config="wan21_t2v_1_3b")
    p.add_argument("--format", choices=("diffusers", "official"), required=True)
    p.add_argument("--src", required=True, help="weights folder, pipeline root or .safetensors file")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--expert", choices=("high", "low"), help="A14B: which expert to import")

    p = command("export", cmd_export, "export a checkpoint to diffusers / official safetensors")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("diffusers", "official"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--expert", choices=("high", "low"),
                   help="A14B: write into transformer/ (high) or transformer_2/ (low)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="tensor dtype to write")

    p = command("data", cmd_data, "write datasets: the synthetic world or a JSONL manifest")
    data = p.add_subparsers(dest="data_command", required=True)
    q = data.add_parser("synthetic", help="render N synthetic multi-shot films into a dataset")
    q.add_argument("--num-films", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q = data.add_parser("build", help="JSONL manifest of videos -> TFDS (ArrayRecord) dataset")
    q.add_argument("--manifest", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    print(args.fn(args, rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
