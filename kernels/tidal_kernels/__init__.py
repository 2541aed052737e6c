"""Triton kernels, each with a pure-torch reference (``reference``) and parity tests.

- ``fused_logprob.fused_token_logprobs``: per-token log-prob of the label and entropy of
  ``softmax(hidden @ weight.T)``, forward and backward, without the ``[tokens x vocab]``
  logits (used by ``tidal.objectives.logprobs.model_token_logprobs`` on CUDA).

Import the modules themselves: importing this package does not import triton.
"""
