"""Prepare a corpus: read -> tokenize -> pack -> shards + manifest.json (Ray Data).

    python jobs/prepare.py data=tinyshakespeare
    python jobs/prepare.py data.sources='[/path/a.jsonl,s3://bucket/dir/]' data.text_field=content
"""
import _hydra
import hydra

from tidal.config import PrepareConfig, validate_prepare

_hydra.register("prepare_schema", PrepareConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="prepare")
def main(cfg) -> None:
    config = _hydra.build(cfg, PrepareConfig, validate_prepare)
    from tidal.data.prepare import default_output_dir, prepare
    from tidal.tracking.console import print_summary
    from tidal.train.launch import init_ray

    out = default_output_dir(config.data, config.run.output_dir)
    with _hydra.reported(out):
        init_ray()
        manifest = prepare(config.data, out)
    c = manifest["counts"]
    print_summary("data prepared", {
        "output": out, "documents": c["documents"], "malformed": sum(c["malformed"].values()),
        "train_samples": c["train"]["samples"], "val_samples": c["val"]["samples"],
        "train_tokens": c["train"]["tokens"], "vocab_size": manifest["tokenizer"]["vocab_size"]})


if __name__ == "__main__":
    _hydra.run(main, PrepareConfig)
