"""One source of truth for configuration: every stage's conf file, composed by Hydra with no
overrides, is exactly the stage's schema defaults (so what the tests build from the schema
is what `python jobs/<stage>.py` trains), apart from the values made per launch (the run
name's timestamp, the output directory from the environment)."""
import os
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import ROOT
from tidal import stages
from tidal.config import from_dict, to_dict

sys.path.insert(0, os.path.join(ROOT, "jobs"))
import _hydra  # noqa: E402 - registers the schemas with Hydra's config store

PER_LAUNCH = {("run", "name"), ("run", "output_dir")}


def composed(name: str) -> dict:
    _hydra.register(f"{name}_schema", stages.get(name).schema)
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose(config_name=name)
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


def differences(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from differences(a.get(k), b.get(k), path + (k,))
    elif a != b and path not in PER_LAUNCH:
        yield f"{'.'.join(path)}: conf {a!r} != schema {b!r}"


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_conf_files_compose_to_the_schema_defaults(name):
    stage = stages.get(name)
    got = to_dict(from_dict(stage.schema, composed(name)))
    want = to_dict(stage.schema())
    assert list(differences(got, want)) == []


def test_a_drift_would_be_seen():
    data = composed("pretrain")
    data["model"]["hidden_size"] += 64
    assert list(differences(data, to_dict(stages.get("pretrain").schema()))) == [
        f"model.hidden_size: conf {data['model']['hidden_size']} != schema {data['model']['hidden_size'] - 64}"]
