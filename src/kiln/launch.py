"""`kiln launch slurm`: an sbatch script that runs ``kiln train`` on K nodes x G GPUs.

The script starts one ``torchrun`` per node with ``srun``; torchrun starts one kiln rank per GPU
and the ranks meet at a c10d rendezvous on the allocation's first node. Two minutes before the
time limit Slurm warns the script, the warning reaches every rank, kiln writes a checkpoint and
stops, and the job requeues itself; the next start resumes from that checkpoint, because
``kiln train CONFIG`` on a run directory with checkpoints resumes. docs/scaling.md explains it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kiln.errors import KilnError

WARN_SECONDS = 120
"""How long before the time limit Slurm sends SIGUSR1 (checkpoint-and-stop) to the job."""

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(value: str) -> int | None:
    """Seconds in a Slurm --time value (MIN, MIN:SEC, H:M:S, D-H, D-H:M, D-H:M:S); None for
    UNLIMITED. Raises KilnError for anything else."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise KilnError(f"--time {value!r} is not a Slurm time; write MINUTES, HH:MM:SS or "
                        "D-HH:MM:SS (e.g. 24:00:00)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def _sbatch_value(flag: str, value: str) -> str:
    """A value that goes onto an #SBATCH line: one word, no line breaks."""
    if not value or any(ch.isspace() for ch in value):
        raise KilnError(f"{flag} {value!r} must be one word without spaces")
    return value


def _sbatch_arg(value: str) -> str:
    """`value` written the way sbatch reads #SBATCH lines: whitespace splits words, double
    quotes group them, a backslash escapes the next character and an unescaped # starts a
    comment."""
    v = value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{v}"' if any(ch.isspace() for ch in value) else v


def slurm_script(config_path: str, *, nodes: int, gpus_per_node: int, overrides: list[str],
                 job_name: str | None, time: str | None, partition: str | None,
                 account: str | None, port: int = 29500, python: str = "python",
                 extra_sbatch: list[str] = (), cpus_per_task: int | None = None,
                 workdir: str | None = None) -> str:
    """The sbatch script that trains CONFIG (plus `overrides`) on nodes x gpus_per_node GPUs.

    The config and overrides are loaded and validated here, so a typo fails now and not after
    the job waited in the queue. `python` is the interpreter on the compute nodes that has kiln
    installed; the default ("python") runs `torchrun` from PATH, i.e. from the environment
    sbatch was called in (sbatch exports it to the job). `workdir` (default: the current
    directory) is where the job runs, so relative paths in the config mean what they mean here.
    """
    from kiln.config import load_run_config

    if nodes < 1:
        raise KilnError(f"--nodes={nodes}: a job needs at least 1 node")
    if gpus_per_node < 1:
        raise KilnError(f"--gpus-per-node={gpus_per_node}: kiln launch slurm needs at least 1 "
                        "GPU per node (run `kiln train` directly on CPU)")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise KilnError(f"--cpus-per-task={cpus_per_task} must be at least 1")
    if not 1 <= port <= 65535:
        raise KilnError(f"--port={port} is not a TCP port (1-65535)")
    overrides = list(overrides)
    cfg = load_run_config(config_path, overrides)

    world = nodes * gpus_per_node
    t = cfg.trainer
    if t.global_batch_size % (t.micro_batch_size * world):
        raise KilnError(
            f"trainer.global_batch_size={t.global_batch_size} does not split over {world} ranks "
            f"({nodes} nodes x {gpus_per_node} GPUs) in micro-batches of "
            f"trainer.micro_batch_size={t.micro_batch_size}; use a global batch that is a "
            f"multiple of {t.micro_batch_size * world} or a smaller micro-batch")
    if cfg.parallel.dp == "none" and world > 1:
        raise KilnError(f"parallel.dp=none cannot use {world} GPUs; set --parallel.dp to ddp, "
                        "fsdp or hsdp (or auto)")
    if time is not None:
        seconds = time_limit_seconds(time)
        if seconds is not None and seconds <= WARN_SECONDS:
            raise KilnError(f"--time {time} is not longer than the {WARN_SECONDS} s checkpoint "
                            "warning; ask for more time")
    for opt in extra_sbatch:
        if not opt.startswith("-") or "\n" in opt or "\r" in opt:
            raise KilnError(f"--sbatch {opt!r} is not an sbatch option; write it as "
                            "--sbatch=--exclusive or --sbatch=--qos=high")

    workdir = os.path.abspath(workdir or os.getcwd())
    run_dir = Path(t.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else Path(workdir) / run_dir
    run_dir_s = os.path.normpath(str(run_dir))
    for flag, value in (("trainer.run_dir", run_dir_s), ("working directory", workdir)):
        if any(ch in value for ch in "\n\r%\\"):
            raise KilnError(f"{flag} {value!r} contains a line break, '%' or '\\' (Slurm reads "
                            "them in file names); use a plainer path")
    name = job_name or f"kiln-{run_dir.name or 'run'}"
    if not name.strip() or "\n" in name or "\r" in name:
        raise KilnError(f"--job-name {name!r} must be a non-empty single line")
    q = shlex.quote
    launcher = "torchrun" if python == "python" else f"{q(python)} -m torch.distributed.run"
    kiln_args = " ".join(q(a) for a in [config_path, *overrides])

    regen = ["kiln launch slurm", q(config_path), f"--nodes={nodes}",
             f"--gpus-per-node={gpus_per_node}"]
    for flag, value in (("--cpus-per-task", cpus_per_task), ("--time", time),
                        ("--partition", partition), ("--account", account),
                        ("--job-name", job_name)):
        if value is not None:
            regen.append(f"{flag}={q(str(value))}")
    if port != 29500:
        regen.append(f"--port={port}")
    if python != "python":
        regen.append(f"--python={q(python)}")
    regen += [f"--sbatch={q(o)}" for o in extra_sbatch] + [q(o) for o in overrides]

    L: list[str] = [
        "#!/bin/bash",
        "# Generated by `kiln launch slurm`; submit it with `sbatch FILE`. Regenerate with:",
        "#   " + " ".join(regen).replace("\n", " ").replace("\r", " "),
        f"# {nodes} node{'s' if nodes > 1 else ''} x {gpus_per_node} GPUs = {world} kiln "
        f"rank{'s' if world > 1 else ''}; run directory {run_dir_s}",
        "#",
        "# One task per node: that task is torchrun, which starts one kiln rank per GPU.",
        f"#SBATCH --job-name={_sbatch_arg(name)}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
    ]
    if cpus_per_task is not None:
        L += ["# CPU cores for each node's torchrun and its ranks (data prefetch threads).",
              f"#SBATCH --cpus-per-task={cpus_per_task}"]
    if time is not None:
        L.append(f"#SBATCH --time={_sbatch_value('--time', time)}")
    if partition is not None:
        L.append(f"#SBATCH --partition={_sbatch_value('--partition', partition)}")
    if account is not None:
        L.append(f"#SBATCH --account={_sbatch_value('--account', account)}")
    L += [
        "# Run where the script was generated, so relative paths in the config (data.paths,",
        "# trainer.run_dir) and the config path mean the same thing in the job.",
        f"#SBATCH --chdir={_sbatch_arg(workdir)}",
        "# The log goes into the run directory (which must exist: `kiln launch` created it);",
        "# append, so the log of a requeued job keeps the earlier attempts above the new one.",
        f"#SBATCH --output={_sbatch_arg(run_dir_s + '/slurm-%j.out')}",
        "#SBATCH --open-mode=append",
        f"# {WARN_SECONDS} s before the time limit Slurm sends SIGUSR1 to this script (B: = the",
        "# batch shell only); the trap below passes it on to kiln, which saves a checkpoint.",
        f"#SBATCH --signal=B:USR1@{WARN_SECONDS}",
        "# Allow the job to go back into the queue: on preemption and node failure Slurm",
        "# requeues it, after the time-limit warning this script does (scontrol requeue).",
        "#SBATCH --requeue",
    ]
    if extra_sbatch:
        L.append("# Extra options given with --sbatch.")
        L += [f"#SBATCH {o}" for o in extra_sbatch]
    L += [
        "",
        ': "${SLURM_JOB_ID:?submit this script with sbatch}"',
        "",
        "# One OpenMP thread per rank: the ranks of a node would otherwise oversubscribe its",
        "# cores (torchrun sets the same, with a warning, when it is unset).",
        "export OMP_NUM_THREADS=1",
        "# A failed or timed-out NCCL collective raises in every rank and ends the job, instead",
        "# of leaving the other ranks blocked until the time limit.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "# NCCL prints its warnings (e.g. a network interface it could not use) to the log.",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "# Log lines reach the log file when they are printed, not when a buffer fills.",
        "export PYTHONUNBUFFERED=1",
        "# torchrun passes SIGUSR1 on to the kiln ranks (torch >= 2.9; an older torchrun exits",
        "# on it and the job resumes from the previous periodic checkpoint instead) ...",
        "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "# ... and gives them the whole warning to save before it kills them (default 30 s;",
        "# torch versions without this setting keep the 30 s).",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={WARN_SECONDS}",
    ]
    if cpus_per_task is not None:
        L += ["# Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch by itself.",
              'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"']
    L += [
        "",
        "# The allocation's first node hosts torchrun's c10d rendezvous; the others connect.",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        'echo "kiln-launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on'
        f' $SLURM_JOB_NODELIST, rendezvous $HEAD:{port}"',
        "",
        "# Time-limit warning: pass SIGUSR1 to srun, which forwards it to torchrun on every",
        "# node, which forwards it to every rank; kiln finishes the step, saves a checkpoint and",
        "# exits 0. The job is then requeued and its next start resumes from that checkpoint.",
        "requeue=0",
        "on_time_limit() {",
        f'    echo "kiln-launch: time limit in {WARN_SECONDS} s: asking kiln to save and stop"'
        " >&2",
        "    requeue=1",
        '    kill -USR1 "$srun_pid" 2>/dev/null',
        "}",
        "trap on_time_limit USR1",
        "# scancel, preemption and the time limit itself send SIGTERM to this shell and to",
        "# torchrun, which passes it on to kiln. Do not forward it (srun turns SIGTERM into a",
        "# kill of every rank) and do not exit (that ends the job while kiln is saving).",
        "trap 'echo \"kiln-launch: SIGTERM: waiting for kiln to save and stop\" >&2' TERM",
        "",
        "# --kill-on-bad-exit=1: if torchrun fails on one node, srun stops the other nodes at",
        "# once instead of leaving them waiting on a collective that never completes.",
        "# Every node runs the same command; the rendezvous assigns the ranks. kiln resumes",
        "# from the run directory's latest checkpoint when there is one.",
        f"srun --kill-on-bad-exit=1 {launcher} \\",
        f"    --nnodes=$SLURM_NNODES --nproc-per-node={gpus_per_node} \\",
        f"    --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint=$HEAD:{port} \\",
        f"    -m kiln train {kiln_args} &",
        "srun_pid=$!",
        "# `wait` returns early whenever a trapped signal arrives: wait until srun has exited.",
        'wait "$srun_pid"; status=$?',
        'while kill -0 "$srun_pid" 2>/dev/null; do',
        '    wait "$srun_pid"; status=$?',
        "done",
        "",
        'if [ "$requeue" = 1 ]; then',
        '    echo "kiln-launch: requeueing job $SLURM_JOB_ID; its next start resumes from the'
        ' latest checkpoint" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kiln launch``: a ``slurm`` subcommand (the only launcher so far)."""
    sub = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    p = sub.add_parser(
        "slurm", help="an sbatch script for K nodes x G GPUs",
        description="Write an sbatch script that runs `kiln train CONFIG` with torchrun on "
        "every node (printed, written with --out, or submitted with --submit). Config "
        "overrides are passed through: --optim.lr=3e-4 --trainer.max_duration="
        "'{value: 2e9, unit: tokens}'")
    p.add_argument("config", help="YAML config file, or a run directory to resume")
    p.add_argument("--nodes", type=int, required=True, metavar="K")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                   help="GPUs per node, one kiln rank each")
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                   help="CPU cores per node for its G ranks (default: the cluster's)")
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None, help="default: kiln-RUN_DIR_NAME")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port (default 29500)")
    p.add_argument("--python", default="python", metavar="PATH",
                   help="interpreter with kiln on the compute nodes (default: torchrun from "
                   "the PATH sbatch is called with)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, repeatable: --sbatch=--exclusive")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the script here instead of printing it")
    p.add_argument("--force", action="store_true", help="let --out replace an existing file")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch")


def run_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run ``kiln launch slurm`` from parsed arguments; `overrides` are config overrides."""
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise KilnError(f"{out} exists; pass --force to replace it or choose another --out")
    if out is not None and out.is_dir():
        raise KilnError(f"--out {out} is a directory; give a file name")
    sbatch = shutil.which("sbatch") if args.submit else None
    if args.submit and sbatch is None:
        raise KilnError("sbatch was not found on PATH; run this on a Slurm login node, or drop "
                        "--submit and copy the script there")
    from kiln.config import load_run_config
    from kiln.parallel import check_layout

    cfg = load_run_config(args.config, overrides)  # the layout, checked against the job's GPUs
    check_layout(cfg, args.nodes * args.gpus_per_node)
    tp = cfg.parallel.tp
    if args.gpus_per_node % tp:
        raise KilnError(f"parallel.tp={tp} does not divide --gpus-per-node={args.gpus_per_node}: "
                        "a tensor-parallel group stays within a node (its collectives run every "
                        "layer); choose a tp that divides the GPUs of one node")
    layout = (f"dp {args.nodes * args.gpus_per_node // tp} x tp {tp}" if tp > 1
              else f"dp {args.nodes * args.gpus_per_node}")
    script = slurm_script(
        args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, overrides=overrides,
        job_name=args.job_name, time=args.time, partition=args.partition, account=args.account,
        port=args.port, python=args.python, extra_sbatch=args.sbatch,
        cpus_per_task=args.cpus_per_task)
    run_dir = Path(cfg.trainer.run_dir)
    note = _torchrun_note()
    if note:
        print(f"kiln: note: {note}", file=sys.stderr)
    # Slurm opens RUN_DIR/slurm-%j.out before the script runs and does not create folders.
    run_dir.mkdir(parents=True, exist_ok=True)

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(script)
    if not args.submit:
        if out is None:
            sys.stdout.write(script)
        else:
            print(f"wrote {out} ({args.nodes} x {args.gpus_per_node} GPUs, {layout}, log "
                  f"{run_dir}/slurm-JOBID.out); submit it with: sbatch {shlex.quote(str(out))}")
        return 0

    cmd = [sbatch, str(out)] if out is not None else [sbatch]
    res = subprocess.run(cmd, input=None if out is not None else script, text=True,
                         capture_output=True)
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise KilnError(f"sbatch refused the job: {err}")
    print(res.stdout.strip())
    print(f"log: {run_dir}/slurm-JOBID.out; requeued jobs resume from the latest checkpoint")
    return 0


def _torchrun_note() -> str | None:
    """A warning when this torch's torchrun cannot pass SIGUSR1 on (added in torch 2.9)."""
    try:
        from torch.distributed.launcher.api import LaunchConfig
    except Exception:  # torch without distributed support: nothing to say here
        return None
    import torch

    fields = getattr(LaunchConfig, "__dataclass_fields__", {})
    if "signals_to_handle" not in fields:
        return (f"the torchrun of torch {torch.__version__} does not forward SIGUSR1, so the "
                "time-limit warning stops the job without a final checkpoint (it resumes from "
                "the last periodic one); torch >= 2.9 saves one")
    if "shutdown_timeout" not in fields:
        return (f"the torchrun of torch {torch.__version__} gives the ranks 30 s (not "
                f"{WARN_SECONDS} s) to save after the time-limit warning; a newer torch waits "
                "longer")
    return None
