"""`holocine-jax` command line: demo | train | sample | eval | import | export | data | compile.

Every command takes `--config NAME|PATH` and `--config.key=value` overrides, and prints a
one-line summary of what it wrote. A user error (the rule: USER_ERRORS / `user_error`) ends in
one line `holocine-jax <command>: error: <message>` and exit status 2; `--debug` or
HOLOCINE_DEBUG=1 shows its traceback too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from holocine_jax.config import apply_override, load_config


def cmd_import(args, overrides) -> str:
    import jax
    from flax import nnx

    from holocine_jax.checkpoint import save_params, with_expert
    from holocine_jax.convert import load_diffusers, load_official
    from holocine_jax.files import local_copy

    config = with_expert(load_config(args.config, overrides), args.expert)  # stored in config.json
    load = load_diffusers if args.format == "diffusers" else load_official
    # validates every tensor before writing; a gs:// --src is read from a local mirror
    model = load(local_copy(args.src), config, expert=args.expert)
    save_params(model, args.out, config)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    what = f"the {args.expert} expert's weights" if args.expert else "weights"
    return f"imported {args.format} {what} from {args.src} ({n / 1e6:.1f}M parameters) into {args.out}"


def cmd_export(args, overrides) -> str:
    from holocine_jax.checkpoint import is_lora_run, load_config_json, load_params, stored_expert
    from holocine_jax.convert import save_diffusers, save_official

    expert = stored_expert(args.checkpoint, args.expert)  # A14B: the folder follows config.json
    config = load_config_json(args.checkpoint)
    for item in overrides:  # the architecture comes from the checkpoint; overrides adjust the rest
        apply_override(config, item)
    if config.get("expert") != expert:
        raise ValueError(f"--config.expert={config.expert} disagrees with {args.checkpoint!r}, "
                         f"which holds the {expert!r} expert (its config.json)")
    lora_run = is_lora_run(config)
    if args.format.endswith("-lora"):
        from holocine_jax.convert.lora import adapter_weights, base_reference, save_lora

        if not lora_run:
            raise ValueError(f"--format {args.format}: {args.checkpoint!r} is not a LoRA run (its "
                             "config.json has train.lora.rank 0); export its weights with "
                             "--format diffusers|official")
        fmt = args.format.removesuffix("-lora")
        base = base_reference(config)
        path = save_lora(adapter_weights(load_params(args.checkpoint, config)), args.out,
                         fmt=fmt, base=base, dtype=args.dtype)
        return (f"exported the LoRA adapters of {args.checkpoint} (rank {base['lora']['rank']}, "
                f"alpha {base['lora']['alpha']}, base {base['base']}) as {args.format} to {path}")
    model = load_params(args.checkpoint, config)
    if lora_run:   # the adapters merged into their base: a plain model
        from holocine_jax.model.transformer import merge_lora
        model = merge_lora(model)
    save = save_diffusers if args.format == "diffusers" else save_official
    out = save(model, args.out, expert=expert, dtype=args.dtype)
    merged = " (LoRA run: adapters merged into the base)" if lora_run else ""
    return f"exported {args.checkpoint}{merged} as {args.format} safetensors to {out}"


def cmd_demo(args, overrides) -> str:
    from holocine_jax.demo import run_demo

    config = load_config(args.config, overrides)
    start = time.perf_counter()
    result = run_demo(config, args.workdir, num_films=args.num_films)
    t, paths = result["train"], result["paths"]
    m = {k: round(v, 3) for k, v in result["metrics"].items() if v is not None}
    return (f"demo ({time.perf_counter() - start:.0f}s): trained {t['step']} steps, loss "
            f"{t['first_loss']:.3f} -> {t['loss']:.3f}; film {paths['mp4']}, contact sheet "
            f"{paths['contact_sheet']}, metrics {paths['metrics']} {m}")


def validation_score(config):
    """The validation films' scorer: the eval job's metrics (train/ sits below eval/)."""
    from holocine_jax.eval.job import score_films
    from holocine_jax.eval.scorers import load_scorers

    scorers = load_scorers(config)  # once: TransNetV2 / embedders load and compile once
    return lambda clips, films, truths: score_films(config, clips, films, truths, scorers=scorers)


def cmd_train(args, overrides) -> str:
    from holocine_jax.text import load_text_stack
    from holocine_jax.train.run import train_on_dataset
    from holocine_jax.vae import make_vae

    config = load_config(args.config, overrides)
    data_dir = args.data or config.data.path
    if not data_dir:
        raise SystemExit("train: give the dataset with --data DIR or --config.data.path=DIR")
    tokenizer, encoder = load_text_stack(config)
    s = train_on_dataset(config, data_dir, args.workdir, tokenizer=tokenizer, text_encoder=encoder,
                         vae=make_vae(config), validation_score=validation_score(config))
    return (f"trained steps {s['start_step']} -> {s['step']} (loss {s['loss']:.4f}, skipped "
            f"{s['skipped']}{', preempted' if s['preempted'] else ''}); checkpoints in "
            f"{s['checkpoint_dir']}, metrics in {s['metrics_path']}")


def cmd_sample(args, overrides) -> str:
    from holocine_jax.checkpoint import load_config_json
    from holocine_jax.convert.lora import LoRAUse
    from holocine_jax.prompts import build_prompt
    from holocine_jax.sample.run import FilmRequest, read_prompt_file, run_sample

    if (args.global_caption is None) != (args.shot_caption is None):
        raise ValueError("--global-caption and --shot-caption go together (one --shot-caption "
                         "per shot)")
    if args.prompt_file and (args.cuts or args.frames is not None or args.seed is not None):
        raise ValueError("--cuts, --frames and --seed go with --prompt or --global-caption; a "
                         "--prompt-file gives them per line")
    try:
        cuts = tuple(int(c) for c in args.cuts.split(",")) if args.cuts else None
    except ValueError:
        raise ValueError(f"--cuts must be comma-separated pixel frames, got {args.cuts!r}"
                         ) from None
    first = args.checkpoint[0]
    config = load_config_json(first) if args.config is None else load_config(args.config)
    for item in overrides:
        apply_override(config, item)
    if args.prompt_file:
        films = read_prompt_file(args.prompt_file)
    else:
        prompt = args.prompt if args.prompt is not None else build_prompt(args.global_caption,
                                                                           args.shot_caption)
        films = [FilmRequest(prompt, cuts, args.frames, args.seed)]
    loras = [LoRAUse.parse(text) for text in args.lora or ()]
    written = run_sample(config, first if len(args.checkpoint) == 1 else args.checkpoint, films,
                         args.out, loras=loras)
    return f"sampled {len(written)} film(s) into {args.out}: " + ", ".join(w["mp4"] for w in written)


def cmd_eval(args, overrides) -> str:
    from holocine_jax.checkpoint import checkpoint_dirs, load_config_json
    from holocine_jax.eval.job import run_eval

    paths = checkpoint_dirs(args.checkpoint)  # one directory, HIGH LOW, or a run directory
    config = load_config_json(paths[0]) if args.config is None else load_config(args.config)
    for item in overrides:
        apply_override(config, item)
    results = run_eval(config, paths, args.data, args.workdir, prompts=args.prompts)
    return (f"evaluated {len(results)} checkpoint step(s) {sorted(results)}; metrics.json per "
            f"step under {args.workdir}/eval")


def cmd_data(args, overrides) -> str:
    from holocine_jax.data.dataset import build_dataset, write_synthetic_dataset

    config = load_config(args.config, overrides)
    if args.data_command == "encode":
        import jax

        from holocine_jax.data.encode import encode_dataset

        r = encode_dataset(args.data, config, batch_size=args.batch_size,
                           records_per_file=args.records_per_file, overwrite=args.overwrite,
                           progress=not args.quiet, process_index=jax.process_index(),
                           process_count=jax.process_count())
        return (f"encoded {r['records']} records: {r['files_written']} files written, "
                f"{r['files_skipped']} already done -> {r['cache_dir']}")
    if args.data_command == "synthetic":
        report = write_synthetic_dataset(args.out, args.num_films, args.seed, config)
    else:
        report = build_dataset(args.manifest, args.out, config, strict=args.strict)
    skipped = sum(report["skipped"].values())
    return (f"built {report['examples']} examples, skipped {skipped} "
            f"{dict(report['skipped']) if skipped else ''}-> {report['data_dir']}")


def cmd_compile(args, overrides) -> str:
    from holocine_jax.compile import compile_report, format_report, over_budget

    config = load_config(args.config, overrides)
    programs = tuple(p for p in args.programs.split(",") if p)
    report = compile_report(config, args.topology, num_shots=args.shots, programs=programs)
    print(format_report(report))
    out = args.json or f"compile-{config.name}-{args.topology.replace(':', '-')}.json"
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    problem = over_budget(report)
    if problem:
        raise SystemExit(f"compile: {problem} (report in {out})")
    return f"compiled {', '.join(programs)} for {args.topology}: fits; report in {out}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holocine-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def distributed(p):
        """Peers of a multi-process job named on the command line (parallel.initialize_distributed;
        TPU VMs find them themselves with HOLOCINE_DISTRIBUTED=1)."""
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-process job: process 0's address (env JAX_COORDINATOR_ADDRESS)")
        p.add_argument("--num-processes", type=int, help="processes in the job (env JAX_NUM_PROCESSES)")
        p.add_argument("--process-id", type=int, help="this process, 0-based (env JAX_PROCESS_ID)")

    def command(name, fn, help, default_config="tiny"):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=default_config,
                       help="config name or path (configs/)" if default_config else
                       "config name or path (default: the checkpoint's config.json)")
        p.set_defaults(fn=fn)
        return p

    p = command("demo", cmd_demo, "synthetic data -> train tiny -> sample a film -> metrics (CPU)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--num-films", type=int, default=64, help="synthetic training films")

    p = command("train", cmd_train, "train (or resume) in --workdir on a dataset")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", help="dataset directory (default: config.data.path)")
    distributed(p)

    for name, fn, text in (("sample", cmd_sample, "sample films from a checkpoint"),
                           ("eval", cmd_eval, "evaluate every new step of a checkpoint")):
        p = command(name, fn, text, default_config=None)
        distributed(p)
        if name == "sample":
            p.add_argument("--checkpoint", required=True, action="append",
                           help="checkpoint directory; A14B: --checkpoint HIGH --checkpoint LOW")
            text = p.add_mutually_exclusive_group(required=True)
            text.add_argument("--prompt", help="a HoloCine-format prompt ([global caption] ... "
                              "[per shot caption] ... [shot cut] ...)")
            text.add_argument("--global-caption", help="the global caption; with one "
                              "--shot-caption per shot, builds the HoloCine prompt")
            text.add_argument("--prompt-file", help="JSONL, one film per line: 'prompt', or "
                              "'global_caption' + 'shots' (strings or {caption, start})")
            p.add_argument("--shot-caption", action="append",
                           help="a shot's caption, once per shot in order (with --global-caption)")
            p.add_argument("--cuts", help="pixel cut frames, e.g. 37,73, snapped to the nearest "
                           "4t+1 as the official scripts (default: even)")
            p.add_argument("--frames", type=int, help="pixel frames, 4t+1 (default: config)")
            p.add_argument("--seed", type=int)
            p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH][@SHOTS]",
                           help="a LoRA file (diffusers/peft or ComfyUI layout) applied to every "
                           "expert at STRENGTH (default 1), on 0-based shots SHOTS (e.g. 0,2; "
                           "default: every shot); repeatable")
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--checkpoint", required=True, action="append",
                           help="checkpoint directory (every new step); A14B: --checkpoint HIGH "
                           "--checkpoint LOW, or a run directory holding one checkpoint per expert")
            films = p.add_mutually_exclusive_group(required=True)
            films.add_argument("--data", help="a built dataset: its first config.eval.num_films "
                               "films (synthetic ones keep their ground truth)")
            films.add_argument("--prompts", help="a benchmark JSONL, one film per line: "
                               "global_caption, shots (character tags [character1] ...), cuts, "
                               "frames, seed (example: configs/bench.jsonl)")
            p.add_argument("--workdir", required=True)

    p = command("import", cmd_import, "import diffusers / official Wan weights into a checkpoint",
                default_config="wan21_t2v_1_3b")
    p.add_argument("--format", choices=("diffusers", "official"), required=True)
    p.add_argument("--src", required=True, help="weights folder, pipeline root or .safetensors file")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--expert", choices=("high", "low"),
                   help="A14B (required there): which expert to import; stored in config.json")

    p = command("export", cmd_export, "export a checkpoint to diffusers / official safetensors, "
                "or a LoRA run's adapters alone")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("diffusers", "official", "diffusers-lora", "comfyui-lora"),
                   required=True, help="a LoRA run: diffusers|official write the merged model, "
                   "*-lora the adapters alone (one .safetensors + lora_base.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--expert", choices=("high", "low"),
                   help="A14B: optional check; the checkpoint's stored expert picks transformer/ "
                   "or high_noise_model/ (high), transformer_2/ or low_noise_model/ (low)")
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
    q = data.add_parser("encode", help="cache VAE latents + UMT5 text states of a dataset (resumable)")
    q.add_argument("--data", required=True, help="dataset directory (`data build` / `data synthetic` --out)")
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--records-per-file", type=int, default=256, help="records per cache file (the unit of resume)")
    q.add_argument("--overwrite", action="store_true", help="discard an existing cache (e.g. after changing encoders)")
    q.add_argument("--quiet", action="store_true", help="no per-file progress lines")
    distributed(q)

    p = command("compile", cmd_compile, "AOT-compile train/sample steps for a TPU topology "
                "(needs the `tpu` extra): memory, FLOPs, collectives", default_config="wan22_t2v_a14b")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x2")
    p.add_argument("--shots", type=int, default=5, help="shots in the abstract film")
    p.add_argument("--programs", default="train,sample", help="comma list of train, sample")
    p.add_argument("--json", help="report path (default: compile-CONFIG-TOPOLOGY.json)")
    return parser


# User errors: bad input that the message lets the user fix. They end in one line and exit
# status 2; anything else is a bug and keeps its traceback. The rule, in full:
# - ValueError: bad values in configs, prompts, cuts, checkpoints (CheckpointMismatchError),
#   corrupt safetensors, a `data build` with no usable film or a skip under --strict (BuildError);
# - paths: FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
#   PermissionError;
# - a KeyError raised by a `--config.key=value` override (anywhere else a KeyError is a bug);
# - SystemExit with a message (a command's own usage check).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, ConnectionError)


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user error (see USER_ERRORS), None for anything else."""
    if isinstance(exc, SystemExit):
        message = exc.code if isinstance(exc.code, str) else None
    elif isinstance(exc, KeyError):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        from_override = tb is not None and tb.tb_frame.f_code is apply_override.__code__
        message = str(exc.args[0]) if from_override and exc.args else None
    else:
        message = str(exc) if isinstance(exc, USER_ERRORS) else None
    if message is None:
        return None
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(exc).__name__


def main(argv=None, *, report_errors: bool | None = None) -> int:
    """Run one command; returns the exit status.

    With `report_errors` (default: when `argv` is None, i.e. the console script) a user error
    prints `holocine-jax <command>: error: <message>` on stderr and returns 2, after its traceback
    with `--debug` (anywhere on the line) or HOLOCINE_DEBUG=1; without, it is raised (Python
    callers passing `argv`). Other exceptions are always raised.
    """
    report = argv is None if report_errors is None else report_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (or HOLOCINE_DEBUG=1)")
    args, rest = parser.parse_known_args(argv)
    debug = args.debug or "--debug" in rest or os.environ.get("HOLOCINE_DEBUG", "") not in ("", "0")
    # `compile --mesh.fsdp=8` is shorthand for `--config.mesh.fsdp=8`
    rest = ["--config." + a[2:] if a.startswith("--mesh.") else a for a in rest if a != "--debug"]
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        if args.command != "compile":   # compile targets TPU; the rest must not print libtpu noise
            from holocine_jax.parallel import skip_absent_tpu
            skip_absent_tpu()
        if args.command in ("train", "eval", "sample") or command == "data encode":
            from holocine_jax.parallel import initialize_distributed
            # multi-host slices (every worker runs this command) or explicit peers
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        print(args.fn(args, rest))
    except BaseException as e:
        message = user_error(e) if report else None
        if message is None:
            raise
        if debug:
            traceback.print_exception(e)
        prefix = f"{args.command}: "   # usage checks raise SystemExit("train: ...")
        print(f"holocine-jax {command}: error: {message.removeprefix(prefix)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
