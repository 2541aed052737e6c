"""W&B / console / jsonl sinks, the metrics hub, plots and the run card."""
