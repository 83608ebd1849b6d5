#!/usr/bin/env bash
# Runs the CSI conformance suite (csi-sanity from kubernetes-csi/csi-test) against `s3csi csi`
# with controller and node in one process, backed by a real S3 server on 127.0.0.1.
#
#   tests/csi-sanity.sh [extra csi-sanity flags...]
#
# Needs `csi-sanity` on PATH; without it the script says so and exits 0 (skipped). The S3 server
# is a fresh s3s-fs on a free port, or the endpoint in S3CSI_TEST_ENDPOINT (with
# S3CSI_TEST_ACCESS_KEY / S3CSI_TEST_SECRET_KEY / S3CSI_TEST_REGION), e.g. the MinIO from
# minio-compose.yml. Set S3CSI_BIN to test a prebuilt binary instead of `cargo build --release`.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v csi-sanity >/dev/null 2>&1; then
    say "SKIPPED: csi-sanity is not on PATH. Build it from https://github.com/kubernetes-csi/csi-test" \
        "(cd cmd/csi-sanity && go build -o /usr/local/bin/csi-sanity .) and run this script again."
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "csi-sanity mounts filesystems: run as root"
[ -c /dev/fuse ] || die "/dev/fuse is missing"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/s3csi-sanity.XXXXXX)"
S3_PID=""
CSI_PID=""
cleanup() {
    set +e
    [ -n "$CSI_PID" ] && kill "$CSI_PID" 2>/dev/null && wait "$CSI_PID" 2>/dev/null
    # Anything csi-sanity left mounted under the work directory.
    grep -o " $WORK[^ ]*" /proc/self/mountinfo | sort -r | while read -r mp; do umount -l "$mp"; done
    [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
    if [ "${KEEP_WORK:-0}" = 1 ]; then say "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

if [ -z "${S3CSI_BIN:-}" ]; then
    say "building s3csi (release)"
    (cd "$ROOT" && cargo build --release --quiet)
    S3CSI_BIN="$ROOT/target/release/s3csi"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ -n "${S3CSI_TEST_ENDPOINT:-}" ]; then
    ENDPOINT="$S3CSI_TEST_ENDPOINT"
    export AWS_ACCESS_KEY_ID="${S3CSI_TEST_ACCESS_KEY:?set S3CSI_TEST_ACCESS_KEY}"
    export AWS_SECRET_ACCESS_KEY="${S3CSI_TEST_SECRET_KEY:?set S3CSI_TEST_SECRET_KEY}"
    export AWS_REGION="${S3CSI_TEST_REGION:-us-east-1}"
    say "using S3 endpoint $ENDPOINT"
else
    command -v s3s-fs >/dev/null 2>&1 || die "s3s-fs is not on PATH (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
    PORT="$(free_port)"
    ENDPOINT="http://127.0.0.1:$PORT"
    export AWS_ACCESS_KEY_ID=sanity AWS_SECRET_ACCESS_KEY=sanity-secret AWS_REGION=us-east-1
    mkdir -p "$WORK/s3"
    s3s-fs --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3" \
        >"$WORK/s3.log" 2>&1 &
    S3_PID=$!
    for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
    say "s3s-fs on $ENDPOINT"
fi

SOCKET="$WORK/csi.sock"
RUST_LOG="${RUST_LOG:-info}" "$S3CSI_BIN" csi --csi-endpoint "unix://$SOCKET" --node-id sanity-node \
    --endpoint-url "$ENDPOINT" --force-path-style --state-dir "$WORK/state" >"$WORK/csi.log" 2>&1 &
CSI_PID=$!
for _ in $(seq 1 200); do [ -S "$SOCKET" ] && break; sleep 0.05; done
[ -S "$SOCKET" ] || { cat "$WORK/csi.log"; die "s3csi csi did not start"; }
say "s3csi csi on $SOCKET"

set +e
csi-sanity \
    --csi.endpoint "$SOCKET" \
    --csi.mountdir "$WORK/mnt" \
    --csi.stagingdir "$WORK/staging" \
    --csi.testvolumesize 1073741824 \
    --csi.testvolumeexpandsize 2147483648 \
    "$@" 2>&1 | tee "$WORK/sanity.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    say "csi-sanity failed (exit $rc); driver log follows"
    tail -n 200 "$WORK/csi.log"
fi
grep -E '^(Ran [0-9]+ of|FAIL!|SUCCESS!)' "$WORK/sanity.log" || true
exit "$rc"
