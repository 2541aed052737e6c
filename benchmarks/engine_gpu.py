"""The training engine on one GPU against a bare PyTorch loop, side by side.

tidal: ``build_engine`` + ``train_step`` (FSDP2 over NCCL, bf16 compute with fp32 master
weights and fp32 gradient reduction, fused AdamW, the engine's loss, clipping and
metrics). Bare: the same model and batches in one process with ``torch.autocast`` bf16,
fused AdamW and clipping, no FSDP. Printed: steady-state tokens/s (median step time after
warm-up), MFU, peak memory, and the ratio. Then a checkpoint round trip of the sharded
engine through tidal's safe DCP reader on the device (the values must come back equal).
No Ray here: this measures the engine, not the launcher (see throughput.py for that).

    python benchmarks/engine_gpu.py [--model llama_1b] [--seq 2048] [--micro 4] [--accum 4]
    python benchmarks/engine_gpu.py --device cpu --model tiny --seq 128 --steps 4   # smoke test
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tidal.config import PretrainConfig, from_dict, to_dict  # noqa: E402
from tidal.models import build_model  # noqa: E402
from tidal.objectives import causal_lm_loss, split_sample, to_batch  # noqa: E402
from tidal.train import metrics as M  # noqa: E402

WARMUP = 3


def make_cfg(args) -> PretrainConfig:
    import yaml

    base = to_dict(PretrainConfig())
    with open(os.path.join(ROOT, "conf", "model", f"{args.model}.yaml")) as f:
        base["model"].update({k: v for k, v in yaml.safe_load(f).items()})
    base["data"]["seq_len"] = args.seq
    base["model"]["max_position_embeddings"] = max(args.seq, base["model"]["max_position_embeddings"])
    base["scaling"].update(workers=1, precision="bf16" if args.device == "cuda" else "fp32",
                           activation_checkpointing=args.ac)
    base["train"].update(max_steps=args.steps, global_batch_tokens=args.seq * args.micro * args.accum,
                         micro_batch_size=args.micro)
    base["schedule"]["warmup_steps"] = 2
    return from_dict(PretrainConfig, base)


def batches(args, step: int):
    rng = np.random.default_rng(step)
    return [rng.integers(0, args.vocab, size=(args.micro, args.seq + 1), dtype=np.int64)
            for _ in range(args.accum)]


def bare(cfg, args, device) -> dict:
    model = build_model(cfg.model, args.vocab, 0, 0, cfg.train.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        for mb in batches(args, step):
            inputs, labels = split_sample(torch.from_numpy(mb).to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=inputs).logits
            (causal_lm_loss(logits.float(), labels) / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times[WARMUP:]), "peak_gib": M.peak_memory_gib(device),
           "flops_per_token": M.flops_per_token(M.matmul_params(model), cfg.model.num_layers,
                                                cfg.model.hidden_size, args.seq)}
    del model, opt
    return out


def engine_run(cfg, args, device):
    from tidal.train.engine import build_engine, train_step

    engine = build_engine(cfg, args.vocab, 0, 0, rank=0, world=1, device=device)
    recs = [train_step(engine, [to_batch("lm", b, device) for b in batches(args, step)])
            for step in range(args.steps)]
    steady = recs[WARMUP:]
    return engine, {"step_s": statistics.median(r["step_time_s"] for r in steady),
                    "peak_gib": max(r["peak_mem_gib"] for r in steady),
                    "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
                    "loss": recs[-1]["loss"]}


def checkpoint_round_trip(engine, cfg, args, device) -> bool:
    """Save the sharded engine (DCP over the device's process group), load it into a fresh
    engine through tidal's safe reader, compare every tensor."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from tidal.train import checkpoint as ckpt
    from tidal.train import integrity
    from tidal.train.engine import build_engine

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint_0000001")
        ckpt.save(engine, path, {"config": {}})
        integrity.write_rank_manifest(path, 0)
        integrity.commit(path, 1, engine.step)
        integrity.require_valid(path)
        other = build_engine(cfg, args.vocab, 0, 0, rank=0, world=1, device=device)
        ckpt.load(other, path)
    a, b = get_model_state_dict(engine.model), get_model_state_dict(other.model)
    same = all(torch.equal(a[k].full_tensor() if hasattr(a[k], "full_tensor") else a[k],
                           b[k].full_tensor() if hasattr(b[k], "full_tensor") else b[k]) for k in a)
    return same and other.step == engine.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = make_cfg(args)
    tokens = args.seq * args.micro * args.accum
    base = bare(cfg, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine, mine = engine_run(cfg, args, device)
    same = checkpoint_round_trip(engine, cfg, args, device)
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    base_mfu = M.mfu(tokens / base["step_s"], base["flops_per_token"], peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nmodel={args.model} seq={args.seq} micro={args.micro} accum={args.accum} "
          f"({tokens:,} tokens/step) vocab={args.vocab} steps={args.steps} device={name} "
          f"torch={torch.__version__}")
    print(f"{'run':<56}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    rows = [("bare PyTorch (autocast bf16, fused AdamW)", tokens / base["step_s"], base_mfu, base["peak_gib"]),
            ("tidal engine (FSDP2/NCCL, bf16, fp32 reduce)" + (", act. ckpt" if args.ac else ""),
             tokens / mine["step_s"], mine["mfu"], mine["peak_gib"])]
    for label, tps, util, gib in rows:
        print(f"{label:<56}{tps:>12,.0f}{(f'{util:.3f}' if util else '-'):>8}{gib:>10.1f}")
    print(f"ratio tidal / bare: {base['step_s'] / mine['step_s']:.3f}  (target >= 0.9)")
    print(f"checkpoint round trip through the safe DCP reader on {device.type}: "
          f"{'identical' if same else 'DIFFERENT'}; last loss {mine['loss']:.4f}")
    dist.destroy_process_group()
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
