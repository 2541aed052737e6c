"""tidal: an elastic, fault-tolerant LLM training platform on Ray."""

__version__ = "0.1.0"
