"""Device mesh, FSDP2 wrapping, activation checkpointing, precision policy."""
from tidal.parallel.fsdp import apply, decoder_blocks, make_mesh, resolve_precision

__all__ = ["apply", "decoder_blocks", "make_mesh", "resolve_precision"]
