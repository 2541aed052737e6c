"""Triton kernels, each with a pure-torch reference (added by later issues)."""
