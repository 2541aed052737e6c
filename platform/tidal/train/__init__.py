"""The FSDP2 engine, worker loop, checkpointing (DCP + HF export), metrics, launcher."""
