"""Evaluate an HF model directory: perplexity, bits per byte and token accuracy on held-out
text, SFT loss on held-out instructions, reward-model or DPO preference accuracy on
held-out pairs, a forgetting check against the model it started from, and generations
for a fixed prompt list with the model's chat template. Results: a console table,
``results.json`` and ``samples.jsonl`` in the output directory, and W&B.

    python jobs/evaluate.py model_dir=outputs/<run>/hf [before=...] [text_data=...] [sft_data=...] [pair_data=...]
"""
import json
import os

import _hydra
import hydra

from tidal.config import EvalConfig, validate_eval

_hydra.register("eval_schema", EvalConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg) -> None:
    config = _hydra.build(cfg, EvalConfig, validate_eval)
    from tidal.config import to_dict
    from tidal.evaluate import evaluate, flat_metrics
    from tidal.tracking.console import print_summary
    from tidal.tracking.sinks import WandbSink

    model = os.path.abspath(os.path.expanduser(config.model_dir))
    out = config.output or os.path.join(os.path.dirname(model), f"eval-{os.path.basename(model)}")
    os.makedirs(out, exist_ok=True)
    with _hydra.reported(out):
        results = evaluate(config)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        for s in results.get("samples", []):
            f.write(json.dumps(s) + "\n")
    metrics = flat_metrics(results)
    wandb = WandbSink(config.logger, f"eval-{os.path.basename(os.path.dirname(model))}", out, to_dict(config))
    wandb.log({"step": 0, **metrics})
    wandb.finish(metrics)
    print_summary(f"evaluation of {model}", {**metrics, "results": os.path.join(out, "results.json")})
    for s in results.get("samples", []):
        print(f"\n> {s['prompt']}\n{s['completion']}")


if __name__ == "__main__":
    _hydra.run(main, EvalConfig)
