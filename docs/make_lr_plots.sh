#!/usr/bin/env bash
# Regenerates the LR plots of docs/continued-training.md from real (small) runs on the demo
# data. Run from the repository root after scripts/demo.sh has prepared data/shakespeare.
set -euo pipefail
kiln=.venv/bin/kiln
out=docs/img
work=$(mktemp -d)
small="--model.d_model=64 --model.n_layers=2 --model.n_heads=4 --model.mlp_hidden_size=192
       --data.seq_len=64 --trainer.global_batch_size=8 --trainer.micro_batch_size=8
       --trainer.eval_interval=0 --log.console=false"

# A: 100 steps at constant LR after a 10-step warmup
$kiln train configs/tiny-shakespeare.yaml $small --trainer.run_dir=$work/A \
    --schedule.name=constant --schedule.warmup=10 --trainer.max_duration=100
$kiln schedule $work/A --out $out/lr-resume.png
# extend A to 1000 steps: cosine from the current LR (preview, then do it for 20 steps)
$kiln schedule $work/A --extend-to=1000 --out $out/lr-extend.png
# B: start from A on the same data, keep counters, fresh warmup + cosine to step 400
$kiln schedule configs/tiny-shakespeare.yaml $small --trainer.run_dir=$work/B \
    --init.from=$work/A --schedule.restart=true --schedule.warmup=20 \
    --trainer.max_duration=400 --out $out/lr-restart.png
# C: stopped at step 40 of a 50-step warmup, then new data with counters reset
$kiln train configs/tiny-shakespeare.yaml $small --trainer.run_dir=$work/C \
    --schedule.warmup=50 --trainer.max_duration=300 --trainer.hard_stop=40
$kiln schedule configs/tiny-shakespeare.yaml $small --trainer.run_dir=$work/D \
    --init.from=$work/C --init.load_schedule_position=false --schedule.warmup=50 \
    --trainer.max_duration=200 --out $out/lr-new-data.png
rm -rf "$work"
