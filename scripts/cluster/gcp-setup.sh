#!/usr/bin/env bash
# Create what cluster-gcp.yaml names in your project, and write a copy of it for that project:
#   PROJECT=my-project BUCKET=my-bucket SSH_CIDR=203.0.113.0/24 scripts/cluster/gcp-setup.sh
#   ray up outputs/cluster-gcp.yaml
#
#   tidal-ray-head    service account: custom role tidalRayAutoscaler (gcp-head-role.yaml) on the
#                     project, may act as tidal-ray-worker (and no other account), the bucket
#   tidal-ray-worker  service account: the bucket only
#   the bucket        objects read/write/delete (roles/storage.objectUser) and bucket metadata
#                     (roles/storage.legacyBucketReader), for these two accounts, on it alone
#   tidal-ray         VPC network with one subnetwork (Private Google Access on, so nodes reach
#                     the bucket without external IPs) and Cloud NAT (workers pull the Docker
#                     image and pip packages without external IPs); its firewall admits any
#                     traffic between the cluster's nodes (tag tidal-ray: Ray's ports and the
#                     ephemeral ones NCCL and torch.distributed pick) and SSH to the head (tag
#                     tidal-ray-head) from SSH_CIDR, nothing else
#
# A new network has no other ingress rules (the default network admits SSH from anywhere, so
# the cluster does not use it). Re-running is safe: existing resources are kept, the role, the
# SSH range and the bindings brought up to date. Needs gcloud, logged in with rights to create
# these in PROJECT. Optional: CONFIG (default cluster-gcp.yaml), OUT (default
# outputs/cluster-gcp.yaml), SUBNET_RANGE (default 10.20.0.0/20).
set -euo pipefail
: "${PROJECT:?set PROJECT to your GCP project id}"
: "${BUCKET:?set BUCKET to the training bucket (run.storage_path=gs://BUCKET/...)}"
: "${SSH_CIDR:?set SSH_CIDR to the range allowed to SSH to the head, e.g. 203.0.113.0/24}"
case "$SSH_CIDR" in
  */0|*/0.0.0.0) echo "SSH_CIDR must not be the whole internet; give your own range" >&2; exit 2 ;;
  */*) ;;
  *) echo "SSH_CIDR must be a range such as 203.0.113.7/32" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-cluster-gcp.yaml}
OUT=${OUT:-outputs/cluster-gcp.yaml}
SUBNET_RANGE=${SUBNET_RANGE:-10.20.0.0/20}
# The region the nodes run in, from the config's provider section.
REGION=$(awk '/^provider:/ {p = 1; next} /^[^ #]/ {p = 0} p && $1 == "region:" {print $2; exit}' "$CONFIG")
[ -n "$REGION" ] || { echo "no provider region in $CONFIG" >&2; exit 2; }
NET=tidal-ray
HEAD_SA="tidal-ray-head@$PROJECT.iam.gserviceaccount.com"
WORKER_SA="tidal-ray-worker@$PROJECT.iam.gserviceaccount.com"
ROLE=tidalRayAutoscaler

g() { gcloud "$@" --project="$PROJECT" --quiet; }
exists() { g "$@" --format='value(name)' >/dev/null 2>&1; }

g services enable compute.googleapis.com iam.googleapis.com cloudresourcemanager.googleapis.com

# Network: nodes talk to each other, the head takes SSH from SSH_CIDR, nothing else gets in.
exists compute networks describe "$NET" ||
  g compute networks create "$NET" --subnet-mode=custom
exists compute networks subnets describe "$NET" --region="$REGION" ||
  g compute networks subnets create "$NET" --network="$NET" --region="$REGION" \
    --range="$SUBNET_RANGE" --enable-private-ip-google-access
exists compute routers describe "$NET" --region="$REGION" ||
  g compute routers create "$NET" --network="$NET" --region="$REGION"
exists compute routers nats describe "$NET" --router="$NET" --region="$REGION" ||
  g compute routers nats create "$NET" --router="$NET" --region="$REGION" \
    --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges
exists compute firewall-rules describe "$NET-internal" ||
  g compute firewall-rules create "$NET-internal" --network="$NET" --direction=INGRESS \
    --action=ALLOW --rules=all --source-tags=tidal-ray --target-tags=tidal-ray
if exists compute firewall-rules describe "$NET-ssh"; then
  g compute firewall-rules update "$NET-ssh" --source-ranges="$SSH_CIDR"
else
  g compute firewall-rules create "$NET-ssh" --network="$NET" --direction=INGRESS \
    --action=ALLOW --rules=tcp:22 --source-ranges="$SSH_CIDR" --target-tags=tidal-ray-head
fi

# Service accounts and what they may do.
exists iam service-accounts describe "$HEAD_SA" ||
  g iam service-accounts create tidal-ray-head --display-name="tidal Ray head"
exists iam service-accounts describe "$WORKER_SA" ||
  g iam service-accounts create tidal-ray-worker --display-name="tidal Ray worker"
if exists iam roles describe "$ROLE"; then
  g iam roles update "$ROLE" --file=scripts/cluster/gcp-head-role.yaml
else
  g iam roles create "$ROLE" --file=scripts/cluster/gcp-head-role.yaml
fi
g projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$HEAD_SA" \
  --role="projects/$PROJECT/roles/$ROLE" --condition=None
g iam service-accounts add-iam-policy-binding "$WORKER_SA" --member="serviceAccount:$HEAD_SA" \
  --role=roles/iam.serviceAccountUser

# The bucket, and access to it (on the bucket, not the project).
exists storage buckets describe "gs://$BUCKET" ||
  g storage buckets create "gs://$BUCKET" --location="$REGION" --uniform-bucket-level-access \
    --public-access-prevention
for sa in "$HEAD_SA" "$WORKER_SA"; do
  for role in roles/storage.objectUser roles/storage.legacyBucketReader; do
    g storage buckets add-iam-policy-binding "gs://$BUCKET" --member="serviceAccount:$sa" --role="$role"
  done
done

mkdir -p "$(dirname "$OUT")"
sed "s/your-project-id/$PROJECT/g" "$CONFIG" > "$OUT"
echo "wrote $OUT: ray up $OUT (train with run.storage_path=gs://$BUCKET/tidal)"
