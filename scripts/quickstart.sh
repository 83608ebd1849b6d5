#!/usr/bin/env bash
# One command from a fresh machine to a mounted bucket: installs fuse3 if needed, starts a local
# S3 server, uploads a few demo files through S3, builds s3csi and mounts bucket `demo` at
# ${MOUNTPOINT:-/tmp/s3csi-demo}. Safe to run again.
#
#   scripts/quickstart.sh [DIR]                         # no Docker: moto (scripts/start-s3.sh)
#   S3CSI_SERVER=s3s-fs scripts/quickstart.sh [DIR]     # no Docker: s3s-fs, fast, no empty dirs
#   scripts/quickstart.sh --minio [DIR]                 # Docker: MinIO from minio-compose.yml
#
# Without Docker, scripts/start-s3.sh starts moto (pip install 'moto[server]' when missing), which
# supports everything the mount does, including `mkdir`, but keeps the bucket in memory: stopping
# it loses the data. S3CSI_SERVER=s3s-fs picks s3s-fs instead (stores files on disk, much faster;
# cannot store the marker objects of empty directories). See the header of scripts/start-s3.sh.
set -euo pipefail

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
USE_MINIO=no
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --minio) USE_MINIO=yes; shift ;;
esac
case "${1:-}" in
    -*) printf 'error: unknown option %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
esac
[ $# -le 1 ] || { printf 'error: one mountpoint at most\n\n' >&2; usage >&2; exit 2; }
MOUNTPOINT="${1:-/tmp/s3csi-demo}"
ENDPOINT=http://127.0.0.1:9000
REGION=us-east-1
BUCKET=demo
if [ "$USE_MINIO" = yes ]; then
    export AWS_ACCESS_KEY_ID=minioadmin AWS_SECRET_ACCESS_KEY=minioadmin AWS_REGION="$REGION"
else
    export AWS_ACCESS_KEY_ID=s3csi AWS_SECRET_ACCESS_KEY=s3csi-secret AWS_REGION="$REGION"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v fusermount3 >/dev/null 2>&1; then
    say "installing fuse3 (fusermount3)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3
fi
[ -c /dev/fuse ] || die "/dev/fuse is missing: this machine (or container) has no FUSE access"

if [ "$USE_MINIO" = yes ]; then
    command -v docker >/dev/null 2>&1 || die "docker is not installed; run without --minio to use a local server"
    say "starting MinIO: docker compose -f minio-compose.yml up -d --wait"
    docker compose -f "$ROOT/minio-compose.yml" up -d --wait minio
    docker compose -f "$ROOT/minio-compose.yml" up create-bucket
else
    say "starting the local S3 server (${S3CSI_SERVER:-moto})"
    bash "$ROOT/scripts/start-s3.sh"
fi

# put KEY FILE: upload through the S3 API (SigV4-signed curl), never into the server's data dir.
put() {
    local key=$1 file=$2 sha code
    sha=$(sha256sum "$file" | cut -d' ' -f1)
    code=$(curl -sS --max-time 120 -o /dev/null -w '%{http_code}' -T "$file" \
        --aws-sigv4 "aws:amz:$REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: $sha" "$ENDPOINT/$BUCKET/$key")
    [ "$code" = 200 ] || die "upload of $key failed (HTTP $code)"
    echo "uploaded s3://$BUCKET/$key ($(wc -c <"$file") bytes)"
}

say "uploading demo files to s3://$BUCKET"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Hello from s3csi! This file lives in bucket $BUCKET." >"$work/hello.txt"
printf 'a,b\n1,2\n3,4\n' >"$work/table.csv"
head -c $((4 * 1024 * 1024)) /dev/urandom >"$work/random.bin"
put hello.txt "$work/hello.txt"
put docs/README.md "$ROOT/README.md"
put data/2024/table.csv "$work/table.csv"
put data/random-4MiB.bin "$work/random.bin"

say "building s3csi: cargo build --release"
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (see https://rustup.rs)"
(cd "$ROOT" && cargo build --release)
# Where cargo put it (CARGO_TARGET_DIR or build.target-dir move it out of ./target).
target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null) \
    || target_dir="$ROOT/target"
S3CSI="${target_dir:-$ROOT/target}/release/s3csi"

mkdir -p "$MOUNTPOINT"
MOUNTPOINT="$(cd "$MOUNTPOINT" && pwd -P)"
if grep -q " $MOUNTPOINT " /proc/self/mountinfo; then
    say "$MOUNTPOINT is already mounted: unmounting it first"
    umount "$MOUNTPOINT" || fusermount3 -u "$MOUNTPOINT"
fi

say "mounting bucket $BUCKET at $MOUNTPOINT"
"$S3CSI" mount "$BUCKET" "$MOUNTPOINT" --endpoint-url "$ENDPOINT" --force-path-style --region "$REGION"

say "ls -lR $MOUNTPOINT"
ls -lR "$MOUNTPOINT"
say "cat $MOUNTPOINT/hello.txt"
cat "$MOUNTPOINT/hello.txt"

cat <<DONE

Bucket $BUCKET is mounted at $MOUNTPOINT: read, write, rename and delete files there.
Unmount with:        umount $MOUNTPOINT
DONE
if [ "$USE_MINIO" = yes ]; then
    echo "Stop MinIO:          docker compose -f $ROOT/minio-compose.yml down"
else
    pidfile="${S3CSI_DATA:-/tmp/s3csi-data}.pid"
    if kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
        echo "Stop the S3 server:  kill \"\$(cat $pidfile)\""
        if [ "${S3CSI_SERVER:-moto}" = moto ]; then
            echo "                     (moto keeps the bucket in memory: stopping it loses the data)"
        fi
    else
        echo "The S3 server on 127.0.0.1:9000 was not started by these scripts; stop it the way it was started."
    fi
fi
