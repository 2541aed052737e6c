"""The cluster launcher configs (cluster.yaml on AWS, cluster-gcp.yaml on GCP) and the scripts
under scripts/cluster/ that create what they name: Ray's schema, least-privilege identities,
private workers, the network rules, the token's mode and the pinned package versions."""
import copy
import fnmatch
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts", "cluster")
BUCKET_PLACEHOLDER = "tidal-training-bucket"
CIDR = "198.51.100.0/24"  # a documentation range standing in for the user's


def _load(name):
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def _json(name):
    with open(os.path.join(SCRIPTS, name)) as f:
        return json.load(f)


def _listify(v):
    return v if isinstance(v, list) else [v]


def _workers(cfg):
    return {k: t for k, t in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_cluster_yaml_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    validate_config(prepare_config(cfg))  # fills defaults as `ray up` does; raises jsonschema.ValidationError on a bad key or type
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # the head trains nothing
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(t["resources"].get("spot") for t in types.values())  # a preemptible GPU type
    assert cfg["idle_timeout_minutes"] > 0
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cmds) for cmds in
               (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]))
    # Workers are reached on private addresses (they have no others), the head on its public one.
    assert cfg["provider"]["use_internal_ips"] is True
    assert cfg["provider"]["use_external_head_ip"] is True


def test_schema_check_catches_a_misspelt_key():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(_load("cluster.yaml"))
    bad["available_node_types"]["gpu_8xh100"]["max_wrkers"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        validate_config(prepare_config(bad))


# --- identities and network, as Ray's own bootstrap sees them -------------------------------

def test_aws_every_node_type_names_its_profile_and_group_so_ray_creates_neither():
    from ray.autoscaler._private.aws import config as aws

    cfg = _load("cluster.yaml")
    assert "security_group" not in cfg["provider"]  # Ray's own group would admit SSH from 0.0.0.0/0
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "tidal-ray-head"}
    for name, t in _workers(cfg).items():
        assert t["node_config"]["IamInstanceProfile"] == {"Name": "tidal-ray-worker"}, name
    # The first bootstrap steps, which need no AWS calls when the config names everything:
    # NetworkInterfaces supply subnets and groups, and Ray attaches no default role to the head
    # and creates no security group (each step returns before touching AWS).
    booted = copy.deepcopy(cfg)
    booted["head_node"] = {}
    booted = aws._configure_from_network_interfaces(booted)
    booted = aws._configure_iam_role(booted)
    assert booted["head_node"] == {}
    before = copy.deepcopy(booted)
    assert aws._configure_security_group(booted) == before
    for name, t in booted["available_node_types"].items():
        nc = t["node_config"]
        (iface,) = nc["NetworkInterfaces"]
        assert nc["SecurityGroupIds"] == iface["Groups"] == ["sg-TIDAL-RAY"], name
        # A worker never gets a public address, whatever its subnet maps by default.
        assert iface["AssociatePublicIpAddress"] is (name == cfg["head_node_type"]), name
        assert nc["SubnetIds"] == [iface["SubnetId"]]
    assert {t["node_config"]["SubnetIds"][0] for t in _workers(booted).values()} == {"subnet-WORKERS-PRIVATE"}


@pytest.fixture
def ray_gcp_config(monkeypatch):
    """Ray's GCP bootstrap module. Where the Google API client (which only `ray up` on GCP
    needs) is not installed, stand-ins satisfy its imports: the steps tested here return before
    any API call."""
    from unittest import mock

    stubbed = False
    for name in ("httplib2", "google_auth_httplib2", "googleapiclient", "googleapiclient.discovery",
                 "googleapiclient.errors"):
        try:
            importlib.import_module(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, mock.MagicMock())
            stubbed = True
    before = set(sys.modules)
    yield importlib.import_module("ray.autoscaler._private.gcp.config")
    if stubbed:  # do not leave modules bound to the stand-ins behind
        for name in set(sys.modules) - before:
            if name.startswith("ray.autoscaler._private.gcp"):
                del sys.modules[name]


def test_gcp_every_node_type_names_its_service_account_subnetwork_and_tags(ray_gcp_config):
    gcp = ray_gcp_config
    cfg = _load("cluster-gcp.yaml")
    project, region = cfg["provider"]["project_id"], cfg["provider"]["region"]
    subnetwork = f"projects/{project}/regions/{region}/subnetworks/tidal-ray"
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        role = "head" if name == cfg["head_node_type"] else "worker"
        assert nc["serviceAccounts"] == [{"email": f"tidal-ray-{role}@{project}.iam.gserviceaccount.com",
                                          "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}], name
        (iface,) = nc["networkInterfaces"]
        assert iface["subnetwork"] == subnetwork, name
        assert ("accessConfigs" in iface) is (role == "head"), name  # no external IP on workers
        want_tags = {"tidal-ray", "tidal-ray-head"} if role == "head" else {"tidal-ray"}
        assert set(nc["tags"]["items"]) == want_tags, name
    # With every node type's interface given, Ray's bootstrap adds no default (external-IP)
    # interface to any of them: the step returns before asking the Compute API.
    assert gcp._configure_subnet(copy.deepcopy(cfg), compute=None) == cfg


# --- token and packages ---------------------------------------------------------------------

def _chmods(commands):
    out = []
    for cmd in commands:
        for part in cmd.split("&&"):
            words = shlex.split(part)
            if words[:1] == ["chmod"]:
                out.append((words[1], words[2:]))
    return out


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_token_is_made_owner_only_on_every_node(name):
    cfg = _load(name)
    (target,) = [dst for dst, src in cfg["file_mounts"].items() if src.endswith(".ray/auth_token")]
    # setup_commands run on the head and on every worker, after file_mounts are synced.
    assert ("600", [target]) in _chmods(cfg["setup_commands"])
    for key in ("head_setup_commands", "worker_setup_commands"):  # no later step that loosens it
        assert not [c for c in _chmods(cfg.get(key, [])) if target in c[1]]


def _constraints():
    from packaging.requirements import Requirement

    pins = {}
    with open(os.path.join(SCRIPTS, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == "==", line
                pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_every_node_installs_with_the_constraints_file(name):
    cfg = _load(name)
    mounts = {dst.rstrip("/"): src for dst, src in cfg["file_mounts"].items()}
    installs = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for cmd in cfg.get(key, []):
            for part in cmd.split("&&"):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    installs.append((key, words))
    assert installs and all(key == "setup_commands" for key, _ in installs)  # the same on head and workers
    for _, words in installs:
        assert "-c" in words, words
        path = words[words.index("-c") + 1]
        # The path on the node is inside the synced checkout and is the repository's file.
        mount = max((m for m in mounts if path.startswith(m + "/")), key=len)
        local = os.path.normpath(os.path.join(ROOT, mounts[mount], os.path.relpath(path, mount)))
        assert local == os.path.join(SCRIPTS, "constraints.txt")


def test_constraints_pin_the_versions_pyproject_asks_for():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _constraints()
    assert pins["torch"] == "2.13.0"
    assert Version(pins["ray"]).release[:2] == (2, 60)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        fix = "regenerate: .venv/bin/python scripts/cluster/make_constraints.py > scripts/cluster/constraints.txt"
        assert name in pins, f"{name} is a dependency but not pinned; {fix}"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not {dep}; {fix}"


# --- the AWS policies -----------------------------------------------------------------------

def _statements(doc):
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        yield st, _listify(st["Action"]), _listify(st["Resource"])


def test_aws_bucket_policy_reaches_the_bucket_and_nothing_else():
    bucket = f"arn:aws:s3:::{BUCKET_PLACEHOLDER}"
    granted = {}
    for _, actions, resources in _statements(_json("aws-bucket-policy.json")):
        for action in actions:
            assert action.startswith("s3:") and "*" not in action, action
            for resource in resources:
                assert resource in (bucket, bucket + "/*"), resource
                granted.setdefault(action, set()).add(resource)
    # Listing on the bucket, objects read/write/delete under it: what checkpointing to
    # run.storage_path=s3://... does, and no bucket administration (policy, ACL, deletion).
    assert granted == {"s3:ListBucket": {bucket}, "s3:GetBucketLocation": {bucket},
                       "s3:GetObject": {bucket + "/*"}, "s3:PutObject": {bucket + "/*"},
                       "s3:DeleteObject": {bucket + "/*"}, "s3:AbortMultipartUpload": {bucket + "/*"}}


def test_aws_head_policy_only_manages_this_clusters_workers():
    cfg = _load("cluster.yaml")
    cluster = cfg["cluster_name"]
    worker_profile = {t["node_config"]["IamInstanceProfile"]["Name"] for t in _workers(cfg).values()}
    assert worker_profile == {"tidal-ray-worker"}
    actions = set()
    for st, acts, resources in _statements(_json("aws-head-autoscaler-policy.json")):
        actions |= set(acts)
        cond = st.get("Condition", {})
        assert not any(a.startswith("s3:") for a in acts)  # the bucket comes from aws-bucket-policy.json
        if resources == ["*"]:
            assert acts == ["ec2:DescribeInstances"]  # the only unscoped right: seeing instances
        if "ec2:TerminateInstances" in acts:
            assert cond == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster}}
        if "ec2:CreateTags" in acts:
            assert cond in ({"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster}},
                            {"StringEquals": {"ec2:CreateAction": "RunInstances"}})
        if "ec2:RunInstances" in acts and any(":instance/" in r for r in resources):
            # New instances carry this cluster's tag and the worker profile, never the head's.
            assert cond["StringEquals"] == {"aws:RequestTag/ray-cluster-name": cluster}
            (pattern,) = _listify(cond["ArnLike"]["ec2:InstanceProfile"])
            assert fnmatch.fnmatch("arn:aws:iam::123456789012:instance-profile/tidal-ray-worker", pattern)
            assert not fnmatch.fnmatch("arn:aws:iam::123456789012:instance-profile/tidal-ray-head", pattern)
        if "iam:PassRole" in acts:
            assert acts == ["iam:PassRole"] and resources == ["arn:aws:iam::*:role/tidal-ray-worker"]
            assert cond == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert actions == {"ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags",
                       "ec2:TerminateInstances", "iam:PassRole"}


# --- scripts/cluster/aws_setup.py against a mocked AWS, then Ray's bootstrap and launch ------

@pytest.fixture
def mocked_aws(monkeypatch):
    moto = pytest.importorskip("moto", reason="moto (dev extra) not installed")
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    caches = (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die)
    for c in caches:
        c.cache_clear()
    with moto.mock_aws():
        yield
    for c in caches:
        c.cache_clear()


def _aws_setup():
    spec = importlib.util.spec_from_file_location("aws_setup", os.path.join(SCRIPTS, "aws_setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ingress(group):
    rules = set()
    for p in group["IpPermissions"]:
        ports = (None, None) if p["IpProtocol"] == "-1" else (p.get("FromPort"), p.get("ToPort"))
        rules |= {(p["IpProtocol"], *ports, "cidr", r["CidrIp"]) for r in p.get("IpRanges", [])}
        rules |= {(p["IpProtocol"], *ports, "cidr6", r["CidrIpv6"]) for r in p.get("Ipv6Ranges", [])}
        rules |= {(p["IpProtocol"], *ports, "prefix", r["PrefixListId"]) for r in p.get("PrefixListIds", [])}
        rules |= {(p["IpProtocol"], *ports, "group", r["GroupId"]) for r in p.get("UserIdGroupPairs", [])}
    return rules


def test_aws_setup_creates_what_cluster_yaml_names_and_ray_launches_private_workers(mocked_aws, tmp_path):
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    ec2, iam = boto3.client("ec2", region_name="us-west-2"), boto3.client("iam")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = []
    for cidr in ("10.0.0.0/24", "10.0.1.0/24"):
        sid = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone="us-west-2a")["Subnet"]["SubnetId"]
        # Both map public IPs on launch: the config, not the subnet, keeps workers private.
        ec2.modify_subnet_attribute(SubnetId=sid, MapPublicIpOnLaunch={"Value": True})
        subnets.append(sid)
    head_subnet, worker_subnet = subnets
    bucket = "tidal-test-checkpoints"
    setup = _aws_setup()
    argv = ["--bucket", bucket, "--head-subnet", head_subnet, "--worker-subnet", worker_subnet,
            "--out", str(tmp_path / "cluster-aws.yaml")]
    with pytest.raises(SystemExit):
        setup.main(argv + ["--ssh-cidr", "0.0.0.0/0"])  # SSH from anywhere is refused
    setup.main(argv + ["--ssh-cidr", "203.0.113.0/24"])
    out = setup.main(argv + ["--ssh-cidr", CIDR])  # re-run with another range: reconciled, not added

    # The security group: everything from its own members, SSH from the range, nothing else.
    (group,) = ec2.describe_security_groups(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": ["tidal-ray"]}])["SecurityGroups"]
    gid = group["GroupId"]
    assert _ingress(group) == {("-1", None, None, "group", gid), ("tcp", 22, 22, "cidr", CIDR)}

    # The roles: the bucket for both, the autoscaler rights for the head alone, nothing attached.
    cluster = yaml.safe_load(out.read_text())["cluster_name"]
    for role, policies in {"tidal-ray-head": {"tidal-training-bucket", "tidal-ray-autoscaler"},
                           "tidal-ray-worker": {"tidal-training-bucket"}}.items():
        assert set(iam.list_role_policies(RoleName=role)["PolicyNames"]) == policies
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]
        doc = iam.get_role_policy(RoleName=role, PolicyName="tidal-training-bucket")["PolicyDocument"]
        assert {r for st in doc["Statement"] for r in _listify(st["Resource"])} == \
            {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
        trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
        assert [st["Principal"] for st in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    autoscaler = iam.get_role_policy(RoleName="tidal-ray-head", PolicyName="tidal-ray-autoscaler")
    launch = next(st for st in autoscaler["PolicyDocument"]["Statement"]
                  if st["Action"] == "ec2:RunInstances" and "Condition" in st)
    launch_tag = launch["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"]
    assert launch_tag == cluster  # filled in from the config's cluster_name
    assert boto3.client("s3").head_bucket(Bucket=bucket)  # created, since it did not exist

    # The rendered config: Ray's schema, then Ray's bootstrap creates no group and no role.
    text = out.read_text()
    assert not any(p in text for p in setup.PLACEHOLDERS.values())
    cfg = prepare_config(yaml.safe_load(text))
    validate_config(cfg)
    ec2.create_key_pair(KeyName="tidal-test")
    cfg["auth"]["ssh_private_key"] = str(tmp_path / "key.pem")
    for t in cfg["available_node_types"].values():
        t["node_config"]["KeyName"] = "tidal-test"
    groups = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    roles = {r["RoleName"] for r in iam.list_roles()["Roles"]}
    booted = bootstrap_aws(cfg)
    assert {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]} == groups
    assert {r["RoleName"] for r in iam.list_roles()["Roles"]} == roles
    assert booted["head_node"] == {}  # no default profile put on the head

    # Launch one node of each type the way Ray does (the autoscaler for workers).
    provider = AWSNodeProvider(booted["provider"], booted["cluster_name"])
    for name, t in booted["available_node_types"].items():
        is_head = name == booted["head_node_type"]
        created = provider.create_node(copy.deepcopy(t["node_config"]), {
            TAG_RAY_NODE_KIND: "head" if is_head else "worker", TAG_RAY_USER_NODE_TYPE: name,
            TAG_RAY_NODE_NAME: f"ray-{cluster}-{name}"}, 1)
        (inst,) = [i for r in ec2.describe_instances(InstanceIds=list(created))["Reservations"]
                   for i in r["Instances"]]
        assert bool(inst.get("PublicIpAddress")) is is_head, name
        (iface,) = inst["NetworkInterfaces"]
        assert [g["GroupId"] for g in iface["Groups"]] == [gid]
        assert iface["SubnetId"] == (head_subnet if is_head else worker_subnet)
        arn = inst["IamInstanceProfile"]["Arn"]
        assert arn.endswith("/tidal-ray-head" if is_head else "/tidal-ray-worker"), name
        # What the head's policy requires of a launch holds for what Ray sends for a worker.
        tags = {tag["Key"]: tag["Value"] for tag in inst["Tags"]}
        assert tags["ray-cluster-name"] == launch_tag
        assert fnmatch.fnmatch(arn, launch["Condition"]["ArnLike"]["ec2:InstanceProfile"]) is not is_head


# --- scripts/cluster/gcp-setup.sh with a stand-in gcloud that records its calls --------------

def _run_gcp_setup(tmp_path, existing):
    log = tmp_path / "gcloud.jsonl"
    stub = tmp_path / "bin" / "gcloud"
    stub.parent.mkdir()
    stub.write_text(f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(0 if {existing!r} or "describe" not in sys.argv else 1)
""")
    stub.chmod(0o755)
    out = tmp_path / "cluster-gcp.yaml"
    env = dict(os.environ, PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}", PROJECT="tidal-proj",
               BUCKET="tidal-test-checkpoints", SSH_CIDR=CIDR, OUT=str(out))
    subprocess.run(["bash", os.path.join(SCRIPTS, "gcp-setup.sh")], env=env, check=True,
                   capture_output=True, text=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    for c in calls:
        assert "--project=tidal-proj" in c, c
    return calls, yaml.safe_load(out.read_text())


def _cmd(calls, *prefix):
    """(positional args after the prefix, {flag: value}) for each call starting with prefix."""
    found = []
    for c in calls:
        if c[:len(prefix)] == list(prefix):
            rest = c[len(prefix):]
            flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True)
                         for a in rest if a.startswith("--"))
            found.append(([a for a in rest if not a.startswith("--")], flags))
    return found


def test_gcp_setup_creates_what_cluster_gcp_yaml_names(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    calls, cfg = _run_gcp_setup(tmp_path, existing=False)
    validate_config(prepare_config(cfg))
    project, region = cfg["provider"]["project_id"], cfg["provider"]["region"]
    assert project == "tidal-proj"
    head_sa, worker_sa = (f"tidal-ray-{r}@tidal-proj.iam.gserviceaccount.com" for r in ("head", "worker"))
    nodes = cfg["available_node_types"]

    # Network: a custom-mode network (no default rules) holding the nodes' subnetwork.
    ((net,), net_flags), = _cmd(calls, "compute", "networks", "create")
    assert net_flags["subnet-mode"] == "custom"
    ((sub,), sub_flags), = _cmd(calls, "compute", "networks", "subnets", "create")
    assert sub_flags["network"] == net and sub_flags["region"] == region
    assert "enable-private-ip-google-access" in sub_flags  # the bucket without external IPs
    for t in nodes.values():
        assert t["node_config"]["networkInterfaces"][0]["subnetwork"] == \
            f"projects/{project}/regions/{region}/subnetworks/{sub}"

    # Firewall: SSH from the range to the head's tag; anything else only from the cluster's tag.
    rules = _cmd(calls, "compute", "firewall-rules", "create")
    assert len(rules) == 2
    for _, f in rules:
        assert f["network"] == net and f["direction"] == "INGRESS" and f["action"] == "ALLOW"
    (ssh,) = [f for _, f in rules if "source-ranges" in f]
    (internal,) = [f for _, f in rules if "source-ranges" not in f]
    assert ssh["source-ranges"] == CIDR and ssh["rules"] == "tcp:22" and "source-tags" not in ssh
    assert internal["source-tags"] == internal["target-tags"]
    tags = {k: set(t["node_config"]["tags"]["items"]) for k, t in nodes.items()}
    assert {k for k, v in tags.items() if ssh["target-tags"] in v} == {cfg["head_node_type"]}
    assert all(internal["target-tags"] in v for v in tags.values())

    # Identities: the head's custom role on the project (nothing else there), acting as the
    # worker account only, the bucket for both; the config names these accounts.
    created = [a for a, _ in _cmd(calls, "iam", "service-accounts", "create")]
    assert created == [["tidal-ray-head"], ["tidal-ray-worker"]]
    for k, t in nodes.items():
        want = head_sa if k == cfg["head_node_type"] else worker_sa
        assert t["node_config"]["serviceAccounts"][0]["email"] == want, k
    ((role_id,), role_flags), = _cmd(calls, "iam", "roles", "create")
    role_file = os.path.normpath(os.path.join(ROOT, role_flags["file"]))
    assert role_file == os.path.join(SCRIPTS, "gcp-head-role.yaml")
    assert _cmd(calls, "projects", "add-iam-policy-binding") == [
        (["tidal-proj"], {"member": f"serviceAccount:{head_sa}", "condition": "None",
                          "role": f"projects/tidal-proj/roles/{role_id}", "project": "tidal-proj", "quiet": True})]
    assert _cmd(calls, "iam", "service-accounts", "add-iam-policy-binding") == [
        ([worker_sa], {"member": f"serviceAccount:{head_sa}", "role": "roles/iam.serviceAccountUser",
                       "project": "tidal-proj", "quiet": True})]
    bucket_grants = {(a[0], f["member"], f["role"])
                     for a, f in _cmd(calls, "storage", "buckets", "add-iam-policy-binding")}
    assert bucket_grants == {("gs://tidal-test-checkpoints", f"serviceAccount:{sa}", role)
                             for sa in (head_sa, worker_sa)
                             for role in ("roles/storage.objectUser", "roles/storage.legacyBucketReader")}


def test_gcp_setup_rerun_updates_the_ssh_range_and_role_in_place(tmp_path):
    calls, _ = _run_gcp_setup(tmp_path, existing=True)
    assert not [c for c in calls if "create" in c and c[:1] != ["services"]]  # all there already
    ((name,), flags), = _cmd(calls, "compute", "firewall-rules", "update")
    assert name == "tidal-ray-ssh" and flags["source-ranges"] == CIDR
    assert len(_cmd(calls, "iam", "roles", "update")) == 1


def test_gcp_setup_refuses_ssh_from_anywhere(tmp_path):
    env = dict(os.environ, PROJECT="p", BUCKET="b", SSH_CIDR="0.0.0.0/0", PATH="/usr/bin:/bin")
    res = subprocess.run(["bash", os.path.join(SCRIPTS, "gcp-setup.sh")], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "whole internet" in res.stderr


def test_gcp_head_role_is_compute_instance_lifecycle_only():
    with open(os.path.join(SCRIPTS, "gcp-head-role.yaml")) as f:
        perms = set(yaml.safe_load(f)["includedPermissions"])
    # What Ray's GCP node provider calls on the head (insert, list, get, setLabels, delete, and
    # zone operations to wait on), and what an insert needs for a worker's disk, subnetwork,
    # network tags and service account.
    assert perms == {"compute.instances.create", "compute.instances.delete", "compute.instances.get",
                     "compute.instances.list", "compute.instances.setLabels",
                     "compute.instances.setServiceAccount", "compute.instances.setTags",
                     "compute.disks.create", "compute.subnetworks.use", "compute.zoneOperations.get"}
