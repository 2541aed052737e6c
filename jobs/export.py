"""Export any tidal checkpoint (written by any number of workers) as a Hugging Face directory.

    python jobs/export.py checkpoint=outputs/my-run/checkpoint_0000100 [output=path/or/s3/uri]
    python jobs/export.py checkpoint=outputs/ppo-run/checkpoint_0000020 part=value   # PPO's value model

The checkpoint is verified before anything in it is read; an output directory holding
anything but a previous tidal export is refused unless overwrite=true.
"""
import os

import _hydra
import hydra

from tidal.config import ExportConfig, validate_export

_hydra.register("export_schema", ExportConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(cfg) -> None:
    config = _hydra.build(cfg, ExportConfig, validate_export)
    from tidal.tracking.console import print_summary
    from tidal.train.export import export_checkpoint
    from tidal.train.publish import ExportRefused
    from tidal.train.safe_dcp import UnsafeCheckpointError

    ckpt = config.checkpoint.rstrip("/")
    if "://" not in ckpt:
        ckpt = os.path.abspath(os.path.expanduser(ckpt))
    parent, name = ckpt.rsplit("/", 1)
    dest = config.output or f"{parent}/{'hf' if config.part == 'model' else config.part}-{name}"
    if "://" not in dest:
        dest = os.path.abspath(os.path.expanduser(dest))
    with _hydra.reported(parent if "://" not in parent else os.getcwd()):
        try:
            out = export_checkpoint(ckpt, dest, overwrite=config.overwrite, part=config.part)
        except (ExportRefused, UnsafeCheckpointError, FileNotFoundError) as e:
            _hydra.fail_line(e)
        except ValueError as e:  # a checkpoint that is not committed, intact or signed
            if "checkpoint" not in str(e):
                raise
            _hydra.fail_line(e)
    print_summary("exported", {"checkpoint": ckpt, "part": config.part, "hf_export": out})


if __name__ == "__main__":
    _hydra.run(main, ExportConfig)
