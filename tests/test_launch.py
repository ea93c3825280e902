"""`kiln launch slurm`: the generated sbatch script, checked with the real bash and the real CLI.

No Slurm here, so the srun line itself cannot run; what can be checked is that the script is
valid bash, that it asks Slurm for the right things, and that the overrides it passes through
reach `kiln train` exactly as they were given (bash parses them, kiln loads them).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import assert_one_line_error

from kiln.errors import KilnError
from kiln.launch import slurm_script, time_limit_seconds

MAX_DURATION = "--trainer.max_duration={value: 2e9, unit: tokens}"
OVERRIDES = [MAX_DURATION, "--optim.lr=1e-3", "--trainer.run_dir=runs/it's here"]


def kiln(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def write_config(path: Path, tokens: Path | str = "data/tokens.bin", run_dir="runs/big",
                 **trainer) -> Path:
    cfg = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 192,
                  "vocab_size": 512, "max_seq_len": 64},
        "data": {"paths": [str(tokens)], "seq_len": 32},
        "trainer": {"run_dir": str(run_dir), "global_batch_size": 64, "micro_batch_size": 4,
                    "max_duration": 6, **trainer},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def srun_command(script: str) -> str:
    """The srun command of the script, its backslash-continued lines joined."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    cmd = []
    for line in lines[start:]:
        cmd.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(cmd)


def bash_words(text: str) -> list[str]:
    """The words bash makes of `text` (quotes removed, nothing expanded that is not there)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True,
                         text=True, check=True)
    return out.stdout.split("\0")[:-1]


def two_by_eight(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    script = slurm_script("c.yaml", nodes=2, gpus_per_node=8, overrides=OVERRIDES,
                          job_name="pretrain", time="24:00:00", partition="gpu",
                          account="proj42", extra_sbatch=["--exclusive"], cpus_per_task=96)
    return config, script


def test_script_asks_slurm_for_two_nodes_of_eight_gpus(tmp_path, monkeypatch):
    _, script = two_by_eight(tmp_path, monkeypatch)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    run_dir = tmp_path / "runs" / "it's here"  # the override of trainer.run_dir wins
    assert sbatch == [
        "#SBATCH --job-name=pretrain",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --time=24:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        f"#SBATCH --chdir={tmp_path}",
        f'#SBATCH --output="{run_dir}/slurm-%j.out"',  # quoted as sbatch reads quotes
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
    ]
    # sbatch reads #SBATCH lines only up to the first command
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.startswith("#"))
    assert all(script.splitlines().index(line) < first_command for line in sbatch)
    assert script.startswith("#!/bin/bash\n")


def test_script_runs_one_torchrun_per_node_with_a_c10d_rendezvous(tmp_path, monkeypatch):
    _, script = two_by_eight(tmp_path, monkeypatch)
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    cmd = srun_command(script)
    assert cmd.startswith(
        "srun --kill-on-bad-exit=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=8 "
        "--rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 "
        "-m kiln train c.yaml "), cmd
    assert cmd.endswith(" &")  # in the background, so the shell can catch the warning
    words = shlex.split(cmd)
    assert words[words.index("train") + 1:] == ["c.yaml", *OVERRIDES, "&"]
    # the environment the ranks need, and the warning reaching them
    for line in ("export OMP_NUM_THREADS=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120",
                 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
                 "trap on_time_limit USR1", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script.splitlines() or f"    {line}" in script.splitlines(), line


def test_script_is_valid_bash_and_its_overrides_round_trip(tmp_path, monkeypatch):
    _, script = two_by_eight(tmp_path, monkeypatch)
    (tmp_path / "job.sh").write_text(script)
    check = subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    # what bash hands to `kiln train` is exactly the config path and the overrides
    cmd = srun_command(script)
    kiln_args = cmd[cmd.index("-m kiln train ") + len("-m kiln train "):-len(" &")]
    assert bash_words(kiln_args) == ["c.yaml", *OVERRIDES]
    assert shlex.split(kiln_args) == ["c.yaml", *OVERRIDES]


def test_overrides_in_the_script_reach_kiln_train_as_given(tmp_path, pydoc_tokens):
    """The srun line's kiln arguments, run through bash into the real `kiln train --dry-run`."""
    write_config(tmp_path / "c.yaml", tokens=pydoc_tokens, global_batch_size=8)
    overrides = [MAX_DURATION, "--optim.lr=1e-3", "--trainer.run_dir=runs/a b"]
    out = kiln("launch", "slurm", "c.yaml", "--nodes=1", "--gpus-per-node=2", *overrides,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cmd = srun_command(out.stdout)
    kiln_args = cmd[cmd.index("-m kiln train ") + len("-m kiln train "):-len(" &")]
    dry = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m kiln train "
                          f"{kiln_args} --dry-run"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert dry.returncode == 0, dry.stderr
    resolved = yaml.safe_load(dry.stdout.split("# how this run starts")[0]
                              .split("# resolved config", 1)[1])
    assert resolved["trainer"]["max_duration"] == {"value": 2e9, "unit": "tokens"}
    assert resolved["trainer"]["run_dir"] == "runs/a b"
    assert resolved["optim"]["lr"] == 1e-3


def test_cli_prints_the_script_and_creates_the_log_folder(tmp_path):
    write_config(tmp_path / "c.yaml")
    out = kiln("launch", "slurm", "c.yaml", "--nodes=2", "--gpus-per-node=8",
               "--time", "2-00:00:00", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --job-name=kiln-big" in out.stdout  # default: named after the run
    assert "#SBATCH --time=2-00:00:00" in out.stdout
    assert "#SBATCH --partition" not in out.stdout and "#SBATCH --account" not in out.stdout
    # Slurm does not create the folder of --output; without it the job would fail silently
    assert (tmp_path / "runs" / "big").is_dir()
    check = subprocess.run(["bash", "-n"], input=out.stdout, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_out_writes_the_script_and_refuses_to_overwrite(tmp_path):
    write_config(tmp_path / "c.yaml")
    args = ["launch", "slurm", "c.yaml", "--nodes=2", "--gpus-per-node=8", "--out", "job.sh"]
    out = kiln(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sbatch job.sh" in out.stdout
    job = tmp_path / "job.sh"
    first = job.read_text()
    assert "--nproc-per-node=8" in first

    again = kiln(*args, "--optim.lr=1e-3", cwd=tmp_path)
    assert_one_line_error(again, "job.sh exists", "--force")
    assert job.read_text() == first

    forced = kiln(*args, "--optim.lr=1e-3", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "--optim.lr=1e-3" in job.read_text()


@pytest.mark.parametrize("extra, needles", [
    (["--optim.lrr=1e-3"], ["unknown config key 'optim.lrr'", "did you mean 'optim.lr'"]),
    (["--trainer.global_batch_size=many"], ["trainer.global_batch_size", "expects"]),
    (["--nodes=0"], ["--nodes=0", "at least 1 node"]),
    (["--gpus-per-node=0"], ["--gpus-per-node=0"]),
    (["--trainer.global_batch_size=32"], ["does not split over 16 ranks", "multiple of 64"]),
    (["--time", "24h"], ["--time '24h'", "HH:MM:SS"]),
    (["--time", "1"], ["not longer than the 120 s"]),
    (["--partition", "a b"], ["--partition 'a b'", "one word"]),
    (["--parallel.dp=none"], ["parallel.dp=none", "16 GPUs"]),
    (["--sbatch=exclusive"], ["--sbatch 'exclusive'"]),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, extra, needles):
    write_config(tmp_path / "c.yaml")
    out = kiln("launch", "slurm", "c.yaml", "--nodes=2", "--gpus-per-node=8", "--out",
               "job.sh", *extra, cwd=tmp_path)
    assert_one_line_error(out, *needles)
    assert not (tmp_path / "job.sh").exists()
    assert not (tmp_path / "runs").exists()


def test_missing_config_is_a_one_line_error(tmp_path):
    out = kiln("launch", "slurm", "nope.yaml", "--nodes=1", "--gpus-per-node=1", cwd=tmp_path)
    assert_one_line_error(out, "nope.yaml", "does not exist")


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has sbatch")
def test_submit_without_sbatch_says_so(tmp_path):
    write_config(tmp_path / "c.yaml")
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    out = kiln("launch", "slurm", "c.yaml", "--nodes=1", "--gpus-per-node=8", "--submit",
               "--out", "job.sh", cwd=tmp_path, env=env)
    assert_one_line_error(out, "sbatch was not found")
    assert not (tmp_path / "job.sh").exists()


def test_config_may_be_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    write_config(run / "config.yaml", run_dir="runs/r")
    script = slurm_script("runs/r", nodes=1, gpus_per_node=4, overrides=[], job_name=None,
                          time=None, partition=None, account=None, port=29611,
                          python="/opt/venv/bin/python")
    cmd = srun_command(script)
    assert "/opt/venv/bin/python -m torch.distributed.run --nnodes=$SLURM_NNODES" in cmd
    assert "--rdzv-endpoint=$HEAD:29611 -m kiln train runs/r &" in cmd
    assert "#SBATCH --job-name=kiln-r" in script
    assert "#SBATCH --time" not in script


def test_function_validates_its_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "c.yaml")
    kw = dict(overrides=[], job_name=None, time=None, partition=None, account=None)
    with pytest.raises(KilnError, match="at least 1 node"):
        slurm_script("c.yaml", nodes=0, gpus_per_node=8, **kw)
    with pytest.raises(KilnError, match="at least 1"):
        slurm_script("c.yaml", nodes=1, gpus_per_node=0, **kw)
    with pytest.raises(KilnError, match="unknown config key"):
        slurm_script("c.yaml", nodes=1, gpus_per_node=8, **{**kw, "overrides": ["--x.y=1"]})


@pytest.mark.parametrize("value, seconds", [
    ("30", 1800), ("30:15", 1815), ("24:00:00", 86400), ("2-00:00:00", 172800),
    ("1-12", 129600), ("1-12:30", 131400), ("UNLIMITED", None),
])
def test_slurm_time_limits(value, seconds):
    assert time_limit_seconds(value) == seconds


def test_the_sample_in_the_scaling_guide_is_what_kiln_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "olmo-1b-web.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "olmo-1b"},
        "data": {"paths": ["data/web/tokens.bin"], "seq_len": 4096},
        "trainer": {"run_dir": "runs/olmo-1b-web", "global_batch_size": 512,
                    "micro_batch_size": 4},
        "parallel": {"dp": "fsdp"},
    }))
    script = slurm_script("configs/olmo-1b-web.yaml", nodes=2, gpus_per_node=8,
                          overrides=[MAX_DURATION], job_name=None, time="24:00:00",
                          partition="gpu", account="myproj", cpus_per_task=64,
                          workdir="/scratch/me/kiln")
    guide = (Path(__file__).parent.parent / "docs" / "scaling.md").read_text()
    sample = guide.split("```bash\n#!/bin/bash\n", 1)[1].split("```", 1)[0]
    assert "#!/bin/bash\n" + sample == script


def test_the_layout_is_checked_against_the_jobs_gpus_and_passed_on(tmp_path, monkeypatch):
    from test_cli import kiln_here

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "c.yaml")
    base = ["launch", "slurm", "c.yaml", "--nodes=2", "--gpus-per-node=8", "--out", "job.sh"]
    out = kiln_here(*base, "--parallel.tp=2", "--parallel.dp=fsdp")
    assert out.returncode == 0, out.stderr
    assert "dp 8 x tp 2" in out.stdout
    assert "--parallel.tp=2" in (tmp_path / "job.sh").read_text()  # kiln train gets it
    two = ["launch", "slurm", "c.yaml", "--nodes=2", "--gpus-per-node=2", "--out", "job.sh"]
    assert_one_line_error(kiln_here(*two, "--parallel.tp=4", "--parallel.dp=none", "--force"),
                          "parallel.tp=4 does not divide --gpus-per-node=2")
    assert_one_line_error(kiln_here(*base, "--parallel.tp=2", "--parallel.dp=ddp", "--force"),
                          "parallel.tp=2 combines with parallel.dp=fsdp or hsdp")
