#!/usr/bin/env bash
# Starts a local S3 server without Docker: s3s-fs on 127.0.0.1:9000, access key `s3csi`, secret
# `s3csi-secret`, data under ${S3CSI_DATA:-/tmp/s3csi-data}, with bucket `demo`.
# Idempotent: if our server already answers, it only makes sure the bucket exists.
# Installs s3s-fs with cargo when missing. The server runs in the background; stop it with
#   kill "$(cat "${S3CSI_DATA:-/tmp/s3csi-data}.pid")"
set -euo pipefail

HOST=127.0.0.1
PORT=9000
ACCESS_KEY=s3csi
SECRET_KEY=s3csi-secret
REGION=us-east-1
BUCKET=demo
DATA="${S3CSI_DATA:-/tmp/s3csi-data}"
DATA="${DATA%/}"
LOG="$DATA.log"
PIDFILE="$DATA.pid"
ENDPOINT="http://$HOST:$PORT"
# SHA-256 of an empty body: s3s-fs wants x-amz-content-sha256 on every request.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v curl >/dev/null 2>&1; then
    say "installing curl"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl
fi
curl --help all 2>/dev/null | grep -q -- --aws-sigv4 || die "curl is too old for --aws-sigv4 (need 7.75 or later)"

# s3req METHOD PATH [curl args...]: a SigV4-signed request; prints the HTTP status code.
s3req() {
    local method=$1 path=$2
    shift 2
    # `-X HEAD` would wait for a body that never comes; --head is curl's way.
    if [ "$method" = HEAD ]; then set -- --head "$@"; else set -- -X "$method" "$@"; fi
    curl -sS --max-time 30 -o /dev/null -w '%{http_code}' \
        --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H "x-amz-content-sha256: $EMPTY_SHA256" "$@" "$ENDPOINT$path" 2>/dev/null || true
}

answers_as_ours() { [ "$(s3req GET /)" = 200 ]; }
port_open() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

find_s3s_fs() {
    command -v s3s-fs 2>/dev/null && return 0
    local candidate="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
    return 1
}

if answers_as_ours; then
    say "S3 server already running at $ENDPOINT"
else
    port_open && die "$HOST:$PORT is in use by something that rejects the s3csi credentials; stop it first"
    if ! S3S_FS=$(find_s3s_fs); then
        command -v cargo >/dev/null 2>&1 || die "s3s-fs is missing and cargo is not installed (see https://rustup.rs)"
        say "installing s3s-fs: cargo install s3s-fs --version 0.14.1 --features binary --locked"
        cargo install s3s-fs --version 0.14.1 --features binary --locked
        S3S_FS=$(find_s3s_fs) || die "s3s-fs still not found after cargo install"
    fi
    mkdir -p "$DATA"
    say "starting s3s-fs at $ENDPOINT (data: $DATA, log: $LOG)"
    nohup setsid "$S3S_FS" --host "$HOST" --port "$PORT" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$DATA" >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    # Poll until it answers a signed ListBuckets (30 s at most).
    for _ in $(seq 150); do
        answers_as_ours && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "s3s-fs exited at startup; see $LOG"
        sleep 0.2
    done
    answers_as_ours || die "s3s-fs did not become ready within 30 s; see $LOG"
fi

case "$(s3req HEAD "/$BUCKET")" in
    200) say "bucket $BUCKET exists" ;;
    *)
        code=$(s3req PUT "/$BUCKET")
        case "$code" in
            200 | 409) say "bucket $BUCKET created" ;;
            *) die "cannot create bucket $BUCKET (HTTP $code); see $LOG" ;;
        esac
        ;;
esac

cat <<INFO
S3 endpoint : $ENDPOINT   (path style, region $REGION)
credentials : AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY
stop it with: kill "\$(cat $PIDFILE)"
INFO
