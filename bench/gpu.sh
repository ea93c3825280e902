#!/usr/bin/env bash
# GPU benchmarks of kiln, run from the source tree with nothing installed (PYTHONPATH=src).
#
#   bash bench/gpu.sh [OUT] [PART]      OUT: results folder (default ./gpu-bench-out)
#
# PART (default all; each part is sized to finish in about 8 minutes on one H100):
#   olmo1b         olmo-1b preset, seq 4096, bf16, compile, STEPS steps on random tokens:
#                  one process (olmo1b-single) and FSDP2 under torchrun --nproc-per-node=1
#                  (olmo1b-fsdp); tokens/s/GPU, MFU, peak memory
#   small          the same for llama-150m (12 x 768, ~134M params) (small-single, small-fsdp)
#   peers          bench/peers.py --device cuda --bf16 --shape gpu (kiln vs bare vs HF)
#   loss           fused vs plain lm_head + cross entropy on CUDA (kiln.losses), and
#                  bench/fused_loss.py (CPU) for reference
#   float8         olmo-1b in bf16 and with parallel.float8 (torchao), one process each: the
#                  tokens/s ratio (float8-1b, bf16 from olmo1b-single's settings)
#   tp             llama-150m and olmo-1b with parallel.tp over every visible GPU (one rank
#                  per GPU: NCCL puts no two ranks on one GPU), tp-small and tp-1b; skipped
#                  with a note on a machine with one GPU
#   cp             llama-150m with parallel.cp over every visible GPU at CP_SEQ tokens per
#                  window (cp-small); skipped with a note on a machine with one GPU
#   ac             llama-150m, one process, with activation checkpointing none, selective,
#                  budget (AC_BUDGET) and full: tokens/s and peak memory of each (ac-MODE)
#   all            everything above, in that order (over 10 minutes: on a GPU lease that allows
#                  10 minutes per command, run the parts one command each)
#
# Every run writes under OUT: logs/NAME.log (full output), runs/NAME/ (kiln's run dir with
# metrics.jsonl), NAME.json (summary) and one line per run in OUT/summary.txt.
# The GPU machine needs torch with CUDA; transformers is optional (peers skips the hf row).
#
# Knobs (environment variables):
STEPS=${STEPS:-50}                # optimizer steps per kiln run
SEQ=${SEQ:-4096}                  # tokens per window
GLOBAL_BATCH=${GLOBAL_BATCH:-8}   # windows per optimizer step (8 x 4096 = 32k tokens)
MICRO_1B=${MICRO_1B:-4}           # olmo-1b windows per forward/backward; OOM: 2 (or AC_1B=full)
AC_1B=${AC_1B:-none}              # olmo-1b activation checkpointing: none | full | every_n
MICRO_SMALL=${MICRO_SMALL:-8}     # llama-150m micro-batch
AC_SMALL=${AC_SMALL:-none}
COMPILE=${COMPILE:-true}          # parallel.compile (each block)
PRECISION=${PRECISION:-bf16}
LOG_INTERVAL=${LOG_INTERVAL:-5}   # kiln log.interval
SKIP_STEPS=${SKIP_STEPS:-10}      # steps left out of the steady-state numbers (compile, warmup)
RUN_TIMEOUT=${RUN_TIMEOUT:-420}   # seconds before one run is stopped ...
PART_BUDGET=${PART_BUDGET:-540}   # ... or before the part's runs together pass this many
PEERS_ARGS=${PEERS_ARGS:---reps 3 --steps 20 --warmup 5 --warm-cache}
CP_SEQ=${CP_SEQ:-32768}           # tokens per window for the cp part
AC_BUDGET=${AC_BUDGET:-0.5}       # parallel.ac_budget of the ac part's budget run
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
EXTRA_1B=${EXTRA_1B:-}            # more kiln overrides for the olmo-1b runs
EXTRA_SMALL=${EXTRA_SMALL:-}      # ... and the llama-150m runs
# GPU_BENCH_TINY=1: a CPU smoke test of this script (tiny shapes, a few steps, no GPU needed)
if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
    DEVICE=cpu STEPS=6 SEQ=64 GLOBAL_BATCH=4 MICRO_1B=2 MICRO_SMALL=4 LOG_INTERVAL=2
    SKIP_STEPS=2 COMPILE=${COMPILE_TINY:-false} PRECISION=fp32 CP_SEQ=64
    TINY_MODEL="--model.d_model=64 --model.n_layers=2 --model.n_heads=2 --model.mlp_hidden_size=128"
    EXTRA_1B="$TINY_MODEL $EXTRA_1B" EXTRA_SMALL="$TINY_MODEL $EXTRA_SMALL"
    PEERS_ARGS="--reps 1 --steps 1 --warmup 1 --batch 2 --seq 32 --variants kiln,bare-eager,hf"
    LOSS_ARGS="--tokens 256 --d 64 --vocab 4096 --steps 2"
fi
LOSS_ARGS=${LOSS_ARGS:---tokens 32768 --d 2048 --vocab 50304 --steps 5}

set -uo pipefail
OUT=${1:-./gpu-bench-out}
PART=${2:-all}
PARTS="olmo1b olmo1b-single olmo1b-fsdp small small-single small-fsdp peers loss float8 tp cp ac all"
if [[ " $PARTS " != *" $PART "* ]]; then
    echo "unknown part '$PART'; choose one of: $PARTS" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"/logs "$OUT"/runs "$OUT"/configs
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
FAILED=0

note() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

# -- helpers written into OUT: the token file maker, the kiln runner, the loss comparison ------

cat > "$OUT/make_tokens.py" <<'EOF'
"""Random token ids in kiln's token-file format (NAME.bin + NAME.json sidecar)."""
import sys

import numpy as np

from kiln.data.tokens import TokenWriter

path, n_tokens, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
eos = vocab - 1  # every id drawn is below it: one document, EOS at its end
w = TokenWriter(path, eos_token_id=eos, dtype="uint16" if vocab <= 65536 else "uint32",
                vocab_size=vocab, overwrite=True)
w.write(np.random.default_rng(0).integers(0, eos, n_tokens, dtype=np.int64))
print(f"{path}: {w.close()['tokens']:,} tokens")
EOF

cat > "$OUT/kiln_run.py" <<'EOF'
"""`kiln train ARGS` in this process (as `python -m kiln train` runs it), then, on rank 0, a
summary: steady tokens/s/GPU and MFU from metrics.jsonl (the first SKIP steps left out),
the first SKIP steps' wall time (compile + warmup), and this process's peak CUDA memory."""
import json
import os
import sys

import torch

from kiln.cli import main
from kiln.config import load_run_config

summary_path, skip, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rc = main(argv)
if rc or int(os.environ.get("RANK", "0")) != 0:
    sys.exit(rc)
cfg = load_run_config(argv[1], [a for a in argv[2:] if a.startswith("--") and "." in a])
world = int(os.environ.get("WORLD_SIZE", "1"))
recs = [json.loads(line) for line in open(os.path.join(cfg.trainer.run_dir, "metrics.jsonl"))]
recs = [r for r in recs if "tokens_per_sec" in r]
prev_tokens, first_s, steady_s, steady_tokens, mfu_s = 0, 0.0, 0.0, 0, 0.0
for r in recs:
    dt = (r["tokens"] - prev_tokens) / r["tokens_per_sec"]
    if r["step"] <= skip:
        first_s += dt
    else:
        steady_s += dt
        steady_tokens += r["tokens"] - prev_tokens
        mfu_s += r.get("mfu", 0.0) * dt
    prev_tokens = r["tokens"]
tps = steady_tokens / steady_s if steady_s else float("nan")
out = {
    "run": os.path.basename(cfg.trainer.run_dir), "world_size": world,
    "preset": cfg.model.preset, "params": cfg.model.num_params(),
    "seq": cfg.data.seq_len, "global_batch": cfg.trainer.global_batch_size,
    "micro_batch": cfg.trainer.micro_batch_size,
    "dp": cfg.parallel.dp, "compile": cfg.parallel.compile,
    "activation_checkpointing": cfg.parallel.activation_checkpointing,
    "steps": recs[-1]["step"] if recs else 0, "steady_from_step": skip,
    "tokens_per_sec_per_gpu": tps / world,
    "mfu": mfu_s / steady_s if steady_s and any("mfu" in r for r in recs) else None,
    "step_time_s": steady_s / max(1, recs[-1]["step"] - skip) if recs else None,
    "first_steps_s": first_s, "final_loss": recs[-1]["loss"] if recs else None,
}
if torch.cuda.is_available():
    out["gpu"] = torch.cuda.get_device_name()
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out["torch"] = torch.__version__
with open(summary_path, "w") as f:
    json.dump(out, f, indent=1)
mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a"
mem = (f"peak {out['peak_allocated_gib']:.1f} GiB allocated / "
       f"{out['peak_reserved_gib']:.1f} GiB reserved" if "peak_allocated_gib" in out else
       "peak memory n/a (CPU)")
print(f"RESULT {out['run']}: {out['tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU, MFU {mfu}, "
      f"{mem}, steps {skip + 1}-{out['steps']} at {out['step_time_s']:.3f} s/step, first "
      f"{skip} steps {first_s:.1f} s, loss {out['final_loss']:.3f}")
EOF

cat > "$OUT/loss_cuda.py" <<'EOF'
"""Fused (kiln.losses.linear_cross_entropy) vs plain (full logits + F.cross_entropy) output
layer + loss, forward + backward on CUDA, each variant x dtype in a fresh process: time per
step (CUDA-synchronised mean) and peak memory over the inputs."""
import argparse
import json
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=32768)
ap.add_argument("--d", type=int, default=2048)
ap.add_argument("--vocab", type=int, default=50304)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--device", default="cuda")
ap.add_argument("--child", nargs=2)
a = ap.parse_args()
if a.child:
    import torch
    import torch.nn.functional as F

    from kiln.losses import linear_cross_entropy

    variant, dtype = a.child
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    hidden = torch.randn(a.tokens, a.d, device=dev, requires_grad=True)
    weight = (torch.randn(a.vocab, a.d, device=dev) * 0.02).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.tokens,), device=dev)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with amp:
            if variant == "plain":
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
            else:
                loss, _ = linear_cross_entropy(hidden, weight, targets)
        loss.backward()
        return loss

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    print(json.dumps({"variant": variant, "dtype": dtype, "ms": dt * 1e3, "peak_mib": peak,
                      "loss": loss.item()}))
    sys.exit(0)
print(f"N={a.tokens} d={a.d} V={a.vocab}, forward+backward, mean of {a.steps} steps after one")
rows = []
for dtype in ("bf16", "fp32"):
    for variant in ("plain", "fused"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant, dtype],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{variant:>5} {dtype}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{variant:>5} {dtype}: {r['ms']:8.2f} ms/step  peak {r['peak_mib']:8,.0f} MiB "
              f"over the inputs  loss {r['loss']:.5f}")
print("JSON " + json.dumps(rows))
EOF

# -- the parts ---------------------------------------------------------------------------

PART_START=$SECONDS
limit() {  # the timeout of the next run: RUN_TIMEOUT, or what is left of PART_BUDGET
    local left=$(( PART_BUDGET - (SECONDS - PART_START) ))
    [ "$left" -lt 10 ] && left=10
    echo $(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))
}

tokens_file() {  # tokens_file VOCAB -> path of a token file with enough windows for STEPS steps
    local vocab=$1 path="$OUT/data/random-$1.bin"
    local n=$(( (STEPS + 2) * GLOBAL_BATCH * SEQ + SEQ + 2 ))
    if [ ! -f "$path" ] || [ ! -f "${path%.bin}.json" ]; then
        mkdir -p "$OUT/data"
        "$PYTHON" "$OUT/make_tokens.py" "$path" "$n" "$vocab" >&2 || return 1
    fi
    echo "$path"
}

kiln_bench() {  # kiln_bench NAME single|fsdp PRESET MICRO AC EXTRA
    local name=$1 mode=$2 preset=$3 micro=$4 ac=$5 extra=$6 data vocab
    vocab=$("$PYTHON" -c "from kiln.config import MODEL_PRESETS as P; print(P['$preset'][1]['vocab_size'])") || { FAILED=1; return; }
    data=$(tokens_file "$vocab") || { note "$name: could not write the token file"; FAILED=1; return; }
    local cfg="$OUT/configs/$name.yaml" log="$OUT/logs/$name.log"
    cat > "$cfg" <<EOF
model: {preset: $preset, max_seq_len: $SEQ}
data: {paths: ['$data'], seq_len: $SEQ}
trainer: {run_dir: '$OUT/runs/$name', global_batch_size: $GLOBAL_BATCH, micro_batch_size: $micro,
          max_duration: $STEPS, device: $DEVICE, precision: $PRECISION, eval_interval: 0}
checkpoint: {interval: 0, save_final: false}
log: {interval: $LOG_INTERVAL, console: true}
parallel: {compile: $COMPILE, activation_checkpointing: $ac}
EOF
    rm -rf "$OUT/runs/$name"
    local launch=("$PYTHON")
    local dp=()
    if [ "$mode" = fsdp ]; then
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=1)
        dp=(--parallel.dp=fsdp)
    elif [ "$mode" = tp ]; then
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS")
        dp=(--parallel.tp="$GPUS" --parallel.dp=none)
    elif [ "$mode" = cp ]; then
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS")
        dp=(--parallel.cp="$GPUS" --parallel.dp=fsdp)
    fi
    note "$name: ${launch[*]} kiln_run.py (= kiln train) $cfg ${dp[*]} $extra (micro $micro, AC $ac)"
    # shellcheck disable=SC2086  # $extra: several overrides
    if timeout "$(limit)" "${launch[@]}" "$OUT/kiln_run.py" "$OUT/$name.json" "$SKIP_STEPS" \
            train "$cfg" --no-resume "${dp[@]}" $extra > "$log" 2>&1; then
        grep '^RESULT' "$log" | tee -a "$OUT/summary.txt"
    else
        note "$name: FAILED (exit $?; see $log): $(grep -m1 -iE 'out of memory|error' "$log" | cut -c1-300)"
        tail -n 5 "$log"
        FAILED=1
    fi
}

part_olmo1b_single() { kiln_bench olmo1b-single single olmo-1b "$MICRO_1B" "$AC_1B" "$EXTRA_1B"; }
part_olmo1b_fsdp() { kiln_bench olmo1b-fsdp fsdp olmo-1b "$MICRO_1B" "$AC_1B" "$EXTRA_1B"; }
part_small_single() {
    kiln_bench small-single single llama-150m "$MICRO_SMALL" "$AC_SMALL" "$EXTRA_SMALL"
}
part_small_fsdp() { kiln_bench small-fsdp fsdp llama-150m "$MICRO_SMALL" "$AC_SMALL" "$EXTRA_SMALL"; }

part_float8() {
    kiln_bench bf16-1b single olmo-1b "$MICRO_1B" "$AC_1B" "$EXTRA_1B"
    kiln_bench float8-1b single olmo-1b "$MICRO_1B" "$AC_1B" "--parallel.float8=true $EXTRA_1B"
    "$PYTHON" - "$OUT/bf16-1b.json" "$OUT/float8-1b.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    a, b = (json.load(open(f)) for f in sys.argv[1:3])
    ratio = b['tokens_per_sec_per_gpu'] / a['tokens_per_sec_per_gpu']
    print(f"float8 / bf16 tokens/s: {ratio:.3f}")
except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
    print(f"float8 / bf16 tokens/s: not measured ({e})")
PY
}

several_gpus() {  # several_gpus PART: set GPUS; false (with a note) when there is only one
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then GPUS=2; fi  # (gloo ranks on the CPU)
    if [ "$GPUS" -lt 2 ]; then
        note "$1: skipped: $GPUS GPU visible, and NCCL runs one rank per GPU"
        return 1
    fi
}

part_tp() {
    several_gpus tp || return 0
    kiln_bench tp-small tp llama-150m "$MICRO_SMALL" "$AC_SMALL" "$EXTRA_SMALL"
    kiln_bench tp-1b tp olmo-1b "$MICRO_1B" "$AC_1B" "$EXTRA_1B"
}

part_cp() {
    several_gpus cp || return 0
    local seq=$SEQ
    SEQ=$CP_SEQ kiln_bench cp-small cp llama-150m 1 full "$EXTRA_SMALL"
    SEQ=$seq
}

part_ac() {
    local mode
    for mode in none selective budget full; do
        kiln_bench "ac-$mode" single llama-150m "$MICRO_SMALL" "$mode" \
            "--parallel.ac_budget=$AC_BUDGET $EXTRA_SMALL"
    done
    "$PYTHON" - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for mode in ("none", "selective", "budget", "full"):
    try:
        r = json.load(open(f"{sys.argv[1]}/ac-{mode}.json"))
    except (OSError, ValueError) as e:
        print(f"ac {mode:>9}: not measured ({e})")
        continue
    mem = r.get("peak_allocated_gib")
    print(f"ac {mode:>9}: {r['tokens_per_sec_per_gpu']:10,.0f} tokens/s/GPU, peak "
          + (f"{mem:.2f} GiB allocated" if mem is not None else "memory n/a (CPU)"))
PY
}

part_peers() {
    local log="$OUT/logs/peers.log" bf16=(--bf16)
    [ "$DEVICE" = cpu ] && bf16=()
    note "peers: bench/peers.py --device $DEVICE ${bf16[*]} --shape gpu $PEERS_ARGS"
    # shellcheck disable=SC2086
    if timeout "$(limit)" "$PYTHON" bench/peers.py --device "$DEVICE" "${bf16[@]}" --shape gpu \
            $PEERS_ARGS --child-timeout 300 --json "$OUT/peers.json" > "$log" 2>&1; then
        sed -n '/^medians/,$p' "$log" | tee -a "$OUT/summary.txt"
    else
        note "peers: FAILED (see $log)"; tail -n 20 "$log"; FAILED=1
    fi
}

part_loss() {
    local log="$OUT/logs/loss.log"
    note "loss: fused vs plain on $DEVICE ($LOSS_ARGS), then bench/fused_loss.py (CPU)"
    # shellcheck disable=SC2086
    if timeout "$(limit)" "$PYTHON" "$OUT/loss_cuda.py" --device "$DEVICE" $LOSS_ARGS \
            > "$log" 2>&1; then
        grep -v '^JSON' "$log" | tee -a "$OUT/summary.txt"
        grep '^JSON' "$log" | cut -c6- > "$OUT/loss.json"
    else
        note "loss: FAILED (see $log)"; tail -n 20 "$log"; FAILED=1
    fi
    if timeout "$(limit)" "$PYTHON" bench/fused_loss.py > "$OUT/logs/fused_loss_cpu.log" 2>&1
    then
        sed 's/^/cpu fused_loss.py: /' "$OUT/logs/fused_loss_cpu.log" | tee -a "$OUT/summary.txt"
    else
        note "bench/fused_loss.py: FAILED (see $OUT/logs/fused_loss_cpu.log)"; FAILED=1
    fi
}

note "part $PART; $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1)"
part_olmo1b() { part_olmo1b_single; part_olmo1b_fsdp; }
part_small() { part_small_single; part_small_fsdp; }
run_part() { PART_START=$SECONDS; "part_${1//-/_}"; }  # each part has its own PART_BUDGET

case "$PART" in
    olmo1b|olmo1b-single|olmo1b-fsdp|small|small-single|small-fsdp|peers|loss|float8|tp|cp|ac)
        run_part "$PART" ;;
    all) for p in olmo1b small peers loss; do run_part "$p"; done ;;
esac
note "done (part $PART): results in $OUT/summary.txt"
exit "$FAILED"
