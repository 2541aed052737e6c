import os

import pytest
import yaml

from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_cluster_yaml_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, name)) as f:
        cfg = yaml.safe_load(f)
    validate_config(prepare_config(cfg))  # fills defaults as `ray up` does; raises jsonschema.ValidationError on a bad key or type
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # the head trains nothing
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(t["resources"].get("spot") for t in types.values())  # a preemptible GPU type
    assert cfg["idle_timeout_minutes"] > 0
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cmds) for cmds in
               (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]))


def test_schema_check_catches_a_misspelt_key():
    import copy

    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        cfg = yaml.safe_load(f)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_8xh100"]["max_wrkers"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        validate_config(prepare_config(bad))
