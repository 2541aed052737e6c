"""Create the IAM roles, instance profiles and security group that cluster.yaml uses, and
write a copy of cluster.yaml with their IDs filled in.

    python scripts/cluster/aws_setup.py --bucket my-training-bucket --ssh-cidr 198.51.100.7/32 \\
        --head-subnet subnet-0123 --worker-subnet subnet-4567
    ray up outputs/cluster-aws.yaml

What it creates (names are fixed; cluster.yaml refers to them):
  tidal-ray-head    role + instance profile: aws-bucket-policy.json (the bucket only) and
                    aws-head-autoscaler-policy.json (launch, tag and terminate this cluster's
                    instances, always with the worker profile; pass only the worker role)
  tidal-ray-worker  role + instance profile: aws-bucket-policy.json only
  tidal-ray         security group in the subnets' VPC: all traffic between its members (Ray's
                    ports, and the ephemeral ports NCCL and torch.distributed pick), SSH from
                    --ssh-cidr, nothing else
  the bucket, if it does not exist yet (public access blocked)

The head subnet must give the head a route to the internet (a public subnet: `ray up` reaches
the head over SSH on its public IP); the worker subnet a NAT gateway (workers get no public IP
but pull the Docker image and pip packages). Both in one VPC; an S3 gateway endpoint keeps
checkpoint traffic off the NAT.

Needs boto3 (which `ray up` on AWS needs anyway) and credentials allowed to manage IAM roles and
EC2 security groups. Re-running is safe: existing resources are reused, policies and the group's
rules brought back to exactly what is described here.
"""
import argparse
import ipaddress
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUCKET_PLACEHOLDER = "tidal-training-bucket"
HEAD, WORKER, GROUP = "tidal-ray-head", "tidal-ray-worker", "tidal-ray"
PLACEHOLDERS = {"head_subnet": "subnet-HEAD-PUBLIC", "worker_subnet": "subnet-WORKERS-PRIVATE",
                "group": "sg-TIDAL-RAY"}


def load_policy(name, bucket, cluster_name):
    """A policy file with the bucket and cluster name of this deployment filled in."""
    doc = json.loads((HERE / name).read_text())

    def fill(node):
        if isinstance(node, dict):
            return {k: (cluster_name if k.endswith("/ray-cluster-name") else fill(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str):
            return node.replace(f":::{BUCKET_PLACEHOLDER}", f":::{bucket}")
        return node

    return fill(doc)


def ssh_cidr(value):
    try:
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IPv4 range such as 203.0.113.7/32") from e
    if net.prefixlen == 0:
        raise argparse.ArgumentTypeError("SSH must not be open to the whole internet; give your own range")
    return str(net)


def bucket_name(value):
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an S3 bucket name")
    return value


def ensure_role(iam, name, policies):
    from botocore.exceptions import ClientError

    trust = (HERE / "aws-ec2-trust-policy.json").read_text()
    try:
        iam.get_role(RoleName=name)
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
    except ClientError as e:
        if e.response["Error"]["Code"] != "NoSuchEntity":
            raise
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust,
                        Description="tidal Ray cluster node (scripts/cluster/aws_setup.py)")
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        print(f"{name}: detaching {attached['PolicyArn']} (not part of the least-privilege setup)")
        iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
    for old in set(iam.list_role_policies(RoleName=name)["PolicyNames"]) - set(policies):
        print(f"{name}: deleting inline policy {old} (not part of the least-privilege setup)")
        iam.delete_role_policy(RoleName=name, PolicyName=old)
    for policy_name, doc in policies.items():
        iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(doc))
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "NoSuchEntity":
            raise
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in [r["RoleName"] for r in profile["Roles"]]:
        for other in profile["Roles"]:
            iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=other["RoleName"])
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


SOURCES = {"IpRanges": "CidrIp", "Ipv6Ranges": "CidrIpv6", "PrefixListIds": "PrefixListId",
           "UserIdGroupPairs": "GroupId"}  # the kinds of source an ingress rule can name


def _rules(permissions):
    """IpPermissions as a set of (protocol, from port, to port, source kind, source)."""
    rules = set()
    for p in permissions:
        ports = (None, None) if p["IpProtocol"] == "-1" else (p.get("FromPort"), p.get("ToPort"))
        for kind, key in SOURCES.items():
            rules |= {(p["IpProtocol"], *ports, kind, source[key]) for source in p.get(kind, [])}
    return rules


def _permission(rule):
    protocol, from_port, to_port, kind, source = rule
    perm = {"IpProtocol": protocol, kind: [{SOURCES[kind]: source}]}
    if from_port is not None:
        perm.update(FromPort=from_port, ToPort=to_port)
    return perm


def ensure_group(ec2, vpc_id, cidr):
    """The cluster's security group, its ingress rules brought to exactly: everything from the
    group itself, SSH from `cidr`. Only rules that differ are touched."""
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                  {"Name": "group-name", "Values": [GROUP]}])
    if found["SecurityGroups"]:
        group = found["SecurityGroups"][0]
    else:
        gid = ec2.create_security_group(
            GroupName=GROUP, VpcId=vpc_id,
            Description="tidal Ray cluster: traffic between members, SSH from one range")["GroupId"]
        group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
    gid = group["GroupId"]
    want = {("-1", None, None, "UserIdGroupPairs", gid), ("tcp", 22, 22, "IpRanges", cidr)}
    have = _rules(group["IpPermissions"])
    if have - want:
        stale = [_permission(r) for r in sorted(have - want, key=str)]
        ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=stale)
    if want - have:
        missing = [_permission(r) for r in sorted(want - have, key=str)]
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=missing)
    return gid


def ensure_bucket(s3, bucket, region):
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise  # 403: the name is taken (or not yours to see); pick another
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=bucket, **kwargs)
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})


def render(text, values):
    for key, placeholder in PLACEHOLDERS.items():
        text = text.replace(placeholder, values[key])
    return text


def main(argv=None):
    import boto3

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bucket", type=bucket_name, required=True,
                   help="S3 bucket for checkpoints and data (run.storage_path=s3://BUCKET/...)")
    p.add_argument("--ssh-cidr", type=ssh_cidr, required=True,
                   help="address range allowed to SSH to the head, e.g. your office's /32")
    p.add_argument("--head-subnet", required=True, help="public subnet for the head")
    p.add_argument("--worker-subnet", required=True,
                   help="private subnet (with a NAT gateway) for the workers")
    p.add_argument("--config", default=str(ROOT / "cluster.yaml"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "cluster-aws.yaml"))
    args = p.parse_args(argv)

    text = Path(args.config).read_text()
    missing = [p for p in PLACEHOLDERS.values() if p not in text]
    if missing:
        sys.exit(f"{args.config} lacks {', '.join(missing)}: render from the repository's cluster.yaml")
    cfg = yaml.safe_load(text)
    region, cluster_name = cfg["provider"]["region"], cfg["cluster_name"]
    ec2, iam, s3 = (boto3.client(s, region_name=region) for s in ("ec2", "iam", "s3"))

    subnets = ec2.describe_subnets(SubnetIds=sorted({args.head_subnet, args.worker_subnet}))["Subnets"]
    vpcs = {s["VpcId"] for s in subnets}
    if len(vpcs) != 1:
        sys.exit(f"the head and worker subnets must be in one VPC, got {sorted(vpcs)}")

    ensure_bucket(s3, args.bucket, region)
    bucket_policy = load_policy("aws-bucket-policy.json", args.bucket, cluster_name)
    autoscaler_policy = load_policy("aws-head-autoscaler-policy.json", args.bucket, cluster_name)
    head_arn = ensure_role(iam, HEAD, {"tidal-training-bucket": bucket_policy,
                                       "tidal-ray-autoscaler": autoscaler_policy})
    worker_arn = ensure_role(iam, WORKER, {"tidal-training-bucket": bucket_policy})
    gid = ensure_group(ec2, vpcs.pop(), args.ssh_cidr)
    try:  # spot workers need EC2's spot service-linked role; it exists once per account
        iam.create_service_linked_role(AWSServiceName="spot.amazonaws.com")
    except Exception as e:  # noqa: BLE001 - already there, or not ours to create: say so and go on
        if "has been taken" not in str(e) and "already exists" not in str(e):
            print(f"note: could not create the spot service-linked role ({e}); spot launches need it")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(text, {"head_subnet": args.head_subnet, "worker_subnet": args.worker_subnet,
                                 "group": gid}))
    print(f"instance profiles: {head_arn}\n                   {worker_arn}")
    print(f"security group:    {gid} (SSH from {args.ssh_cidr})")
    print(f"bucket:            s3://{args.bucket} (train with run.storage_path=s3://{args.bucket}/tidal)")
    print(f"wrote {out}; new IAM profiles take a few seconds to become usable: then `ray up {out}`")
    return out


if __name__ == "__main__":
    main()
