"""Export any tidal checkpoint (written by any number of workers) as a Hugging Face directory.

    python jobs/export.py checkpoint=outputs/my-run/checkpoint_0000100 [output=path/or/s3/uri]
"""
import os
import sys

import _hydra
import hydra

from tidal.config import ExportConfig, validate_export

_hydra.register("export_schema", ExportConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(cfg) -> None:
    config = _hydra.build(cfg, ExportConfig, validate_export)
    from tidal.tracking.console import print_summary
    from tidal.train.export import export_checkpoint

    ckpt = config.checkpoint.rstrip("/")
    if "://" not in ckpt:
        ckpt = os.path.abspath(os.path.expanduser(ckpt))
    parent, name = ckpt.rsplit("/", 1)
    dest = config.output or f"{parent}/hf-{name}"
    print_summary("exported", {"checkpoint": ckpt, "hf_export": export_checkpoint(ckpt, dest)})


if __name__ == "__main__":
    _hydra.precheck_overrides(ExportConfig, sys.argv[1:])
    main()
