"""Write tests/data/olmo/: tiny checkpoints written by OLMo itself, for test_interop_olmo.py.

The test suite never runs this (OLMo is not a kiln dependency, and installing it would change
kiln's environment); it reads the files this script wrote, which are checked in. To write them
again, in a throwaway virtual environment that is NOT kiln's::

    python3 -m venv /tmp/olmo-venv
    /tmp/olmo-venv/bin/pip install torch==2.13.0 ai2-olmo==0.6.0 datasets
    /tmp/olmo-venv/bin/python tests/make_olmo_checkpoints.py tests/data/olmo

For each variant it builds OLMo's own model (olmo.model.OLMo) from an OLMo TrainConfig, wraps
it in DDP (gloo, one CPU process), trains a few real AdamW steps with OLMo's optimizer
(olmo.optim.build_optimizer: OLMo's parameter groups) and scheduler, and saves with OLMo's
FullCheckpointer, so config.yaml, model.pt, optim.pt and train.pt are exactly what an OLMo
run writes as stepN-unsharded/. reference.pt holds a batch of token ids, OLMo's logits for it
(eval mode, fp32) and OLMo's LR for every step of the run.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

# OLMo-2 shape: RMSNorm after each sublayer, QK-norm, untied, grouped-query attention
OLMO2_MODEL = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_ratio=4, vocab_size=60,
                   embedding_size=64, max_sequence_length=16, rope=True, rope_theta=500000,
                   weight_tying=False, include_bias=False, layer_norm_type="rms",
                   layer_norm_with_affine=True, layer_norm_eps=1e-6,
                   attention_layer_norm=True, norm_after=True)

VARIANTS = {
    "olmo2": dict(
        model=OLMO2_MODEL,
        scheduler=dict(name="cosine_with_warmup", t_warmup=3, t_max=20, alpha_f=0.1),
        max_duration=20, steps=5),
    # the OLMo-2 shape again, with a cosine that ends (t_max) before the run (max_duration),
    # then holds alpha_f * lr; OLMo then continues 5 more steps on fixed token rows with its
    # own loss normalisation, saved as a second checkpoint for kiln's continuation to match
    "olmo2_tmax": dict(
        model=OLMO2_MODEL,
        scheduler=dict(name="cosine_with_warmup", t_warmup=3, t_max=30, alpha_f=0.1),
        max_duration=50, steps=5, continue_steps=5),
    # OLMo-1 shape: non-parametric LayerNorm before each sublayer, tied, explicit MLP width
    "olmo1": dict(
        model=dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=96, vocab_size=64,
                   embedding_size=64, max_sequence_length=16, rope=True, weight_tying=True,
                   include_bias=False, layer_norm_type="default",
                   layer_norm_with_affine=False),
        scheduler=dict(name="linear_with_warmup", t_warmup=2, alpha_f=0.0, warmup_min_lr=0.0),
        max_duration=12, steps=4),
    # biases everywhere, parametric LayerNorm, multi-query attention, block groups
    "bias_groups": dict(
        model=dict(d_model=32, n_heads=4, multi_query_attention=True, n_layers=2,
                   mlp_ratio=2, vocab_size=50, embedding_size=64, max_sequence_length=16,
                   rope=True, weight_tying=True, include_bias=True, layer_norm_type="default",
                   layer_norm_with_affine=True, block_group_size=2),
        optimizer=dict(decay_norm_and_bias=True),
        scheduler=dict(name="constant_with_warmup", t_warmup=2),
        max_duration=10, steps=3),
}


def main(root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from olmo.checkpoint import FullCheckpointer
    from olmo.config import TrainConfig
    from olmo.model import OLMo
    from olmo.optim import build_optimizer, build_scheduler
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=0, world_size=1)
    for name, v in VARIANTS.items():
        model_cfg = dict(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
                         init_device="cpu", eos_token_id=0, pad_token_id=1, **v["model"])
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        batch, seq = 4, model_cfg["max_sequence_length"]
        cfg = TrainConfig.new(
            model=model_cfg,
            optimizer=dict(name="adamw", learning_rate=1e-2, weight_decay=0.1,
                           betas=[0.9, 0.95], eps=1e-8, **v.get("optimizer", {})),
            scheduler=v["scheduler"], global_train_batch_size=batch,
            device_train_batch_size=batch, device_train_microbatch_size=batch,
            max_duration=v["max_duration"], save_folder=str(out), precision="fp32",
            max_grad_norm=1.0)
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        model = OLMo(cfg.model)
        ddp = DDP(model)
        optim = build_optimizer(cfg, ddp.module)
        sched = build_scheduler(cfg)
        vocab = model_cfg["vocab_size"]
        step = 0
        for _ in range(v["steps"]):
            step += 1
            x = torch.randint(0, vocab, (batch, seq + 1))
            logits = ddp(x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            for g in optim.param_groups:
                g["lr"] = sched.get_lr(cfg.optimizer.learning_rate, step, v["max_duration"])
            optim.step()
            optim.zero_grad(set_to_none=True)
        ckpt_dir = out / f"step{step}-unsharded"
        trainer_state = {
            "epoch": 0, "global_step": step,
            "global_train_examples_seen_this_epoch": step * batch,
            "global_train_tokens_seen": step * batch * seq, "world_size": 1,
            "checkpoints": [], "unsharded_checkpoints": [ckpt_dir],
            "ephemeral_checkpoints": [],
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.random.get_rng_state()},
        }
        FullCheckpointer(cfg).save_checkpoint(ckpt_dir, ddp, optim, trainer_state)
        model.eval()
        ids = torch.randint(0, vocab, (2, seq))
        with torch.no_grad():
            ref_logits = model(ids).logits.float()
        lrs = [sched.get_lr(cfg.optimizer.learning_rate, s, v["max_duration"])
               for s in range(1, v["max_duration"] + 1)]
        torch.save({"input_ids": ids, "logits": ref_logits, "global_step": step,
                    "lr": torch.tensor(lrs, dtype=torch.float64)}, out / "reference.pt")
        print(f"wrote {ckpt_dir}: {sorted(p.name for p in ckpt_dir.iterdir())}")
        if v.get("continue_steps"):
            continue_like_olmo(cfg, model, ddp, optim, sched, step, v, batch, seq, vocab,
                               out, trainer_state)
    dist.destroy_process_group()


def continue_like_olmo(cfg, model, ddp, optim, sched, step, v, batch, seq, vocab, out,
                       trainer_state) -> None:
    """More steps exactly as olmo.train.Trainer takes them (loss summed over the predictions
    and divided by the batch's tokens, OLMo's own gradient clipping, LR from the scheduler),
    on fixed rows of `seq` tokens saved as rows.npy; then a second FullCheckpointer save."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from olmo.checkpoint import FullCheckpointer

    model.train()
    rows = torch.randint(0, vocab, (batch, seq))
    np.save(out / "rows.npy", rows.numpy().astype(np.uint16).reshape(-1))
    for _ in range(v["continue_steps"]):
        step += 1
        logits = ddp(input_ids=rows).logits[..., :-1, :].contiguous()
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), rows[..., 1:].reshape(-1),
                             reduction="sum") / rows.numel()
        ce.backward()
        for g in optim.param_groups:
            g["lr"] = sched.get_lr(cfg.optimizer.learning_rate, step, v["max_duration"])
            g["max_grad_norm"] = cfg.max_grad_norm
            g["max_grad_norm_ratio"] = None
        optim.clip_grads_and_collect_metrics(step, collect_param_metrics=False)
        optim.step()
        optim.zero_grad(set_to_none=True)
    ckpt_dir = out / f"continued-step{step}-unsharded"
    state = dict(trainer_state, global_step=step, unsharded_checkpoints=[ckpt_dir],
                 global_train_tokens_seen=trainer_state["global_train_tokens_seen"]
                 + v["continue_steps"] * batch * seq)
    FullCheckpointer(cfg).save_checkpoint(ckpt_dir, ddp, optim, state)
    print(f"wrote {ckpt_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data" / "olmo"))
