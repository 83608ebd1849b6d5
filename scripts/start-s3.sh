#!/usr/bin/env bash
# Starts a local S3 server without Docker on 127.0.0.1:9000 (path style, region us-east-1,
# access key `s3csi`, secret `s3csi-secret`) with bucket `demo`. The server runs in the background,
# logs to ${S3CSI_DATA:-/tmp/s3csi-data}.log, and its pid is in ${S3CSI_DATA:-/tmp/s3csi-data}.pid;
# stop it with
#   kill "$(cat "${S3CSI_DATA:-/tmp/s3csi-data}.pid")"
#
# S3CSI_SERVER picks the server:
#   moto    (default) moto_server: faithful S3 semantics, so everything the mount does works,
#           including directory marker objects (`mkdir d`). Slow (tens of MiB/s), accepts any
#           credentials, and keeps all data IN MEMORY: stopping it loses every object.
#           Installed with `pip install 'moto[server]'` when missing (python3 and pip via apt-get
#           if those are missing; `--break-system-packages` on an externally managed Python).
#   s3s-fs  for throughput work: fast, checks the credentials, stores objects as files under
#           ${S3CSI_DATA:-/tmp/s3csi-data} (they survive a restart), but cannot store directory
#           markers: the mount warns at start, and `mkdir` makes directories that live in the
#           mount until files are written in them. Installed with `cargo install` when missing.
#           S3CSI_SERVER=s3s-fs scripts/start-s3.sh
#
# Idempotent: if a server already answers on 127.0.0.1:9000 with these credentials, it only makes
# sure the bucket exists (whichever server that is; stop it first to switch servers).
set -euo pipefail

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
    "") ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'error: no arguments are taken (got %s); settings come from the environment\n\n' "$1" >&2; usage >&2; exit 2 ;;
esac

HOST=127.0.0.1
PORT=9000
ACCESS_KEY=s3csi
SECRET_KEY=s3csi-secret
REGION=us-east-1
BUCKET=demo
SERVER="${S3CSI_SERVER:-moto}"
DATA="${S3CSI_DATA:-/tmp/s3csi-data}"
DATA="${DATA%/}"
case "$DATA" in /*) ;; *) DATA="$PWD/$DATA" ;; esac
LOG="$DATA.log"
PIDFILE="$DATA.pid"
ENDPOINT="http://$HOST:$PORT"
# SHA-256 of an empty body: s3s-fs wants x-amz-content-sha256 on every request.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
S3S_FS_VERSION=0.14.1
MOTO_REQUIREMENT='moto[server]'

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

case "$SERVER" in
    moto | s3s-fs) ;;
    *) die "S3CSI_SERVER=$SERVER is not supported: use moto (default) or s3s-fs" ;;
esac

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "$* missing and apt-get is not available: install $* by hand"
    say "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

command -v curl >/dev/null 2>&1 || apt_install curl
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

# The server behind our pid file, if that process still runs: moto, s3s-fs or unknown.
running_server() {
    local pid cmdline
    pid=$(cat "$PIDFILE" 2>/dev/null) || { echo unknown; return; }
    [ -r "/proc/$pid/cmdline" ] || { echo unknown; return; }
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || { echo unknown; return; }
    case "$cmdline" in
        *moto*) echo moto ;;
        *s3s-fs*) echo s3s-fs ;;
        *) echo unknown ;;
    esac
}

# --- s3s-fs -------------------------------------------------------------------------------------

find_s3s_fs() {
    command -v s3s-fs 2>/dev/null && return 0
    local candidate="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
    return 1
}

start_s3s_fs() {
    local exe
    if ! exe=$(find_s3s_fs); then
        command -v cargo >/dev/null 2>&1 || die "s3s-fs is missing and cargo is not installed (see https://rustup.rs)"
        say "installing s3s-fs: cargo install s3s-fs --version $S3S_FS_VERSION --features binary --locked"
        cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
        exe=$(find_s3s_fs) || die "s3s-fs still not found after cargo install"
    fi
    mkdir -p "$DATA"
    say "starting s3s-fs at $ENDPOINT (data: $DATA, log: $LOG)"
    nohup setsid "$exe" --host "$HOST" --port "$PORT" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$DATA" >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
}

# --- moto ---------------------------------------------------------------------------------------

# Prints the command that runs moto's server, one word per line: the moto_server script when it
# is on PATH (or in pip's --user bin directory), else `python3 -m moto.server`.
find_moto() {
    local exe
    for exe in "$(command -v moto_server 2>/dev/null)" "$HOME/.local/bin/moto_server"; do
        [ -n "$exe" ] && [ -x "$exe" ] && { echo "$exe"; return 0; }
    done
    command -v python3 >/dev/null 2>&1 && python3 -c 'import moto.server' 2>/dev/null \
        && { printf '%s\n' python3 -m moto.server; return 0; }
    return 1
}

# Whether python3 is marked "externally managed" (PEP 668, as on Debian 12 and later): pip then
# refuses to install outside a virtualenv unless told --break-system-packages.
externally_managed() {
    python3 - <<'PY' 2>/dev/null
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) and not in_venv else 1)
PY
}

install_moto() {
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    # Not root: pip falls back to a --user install into ~/.local by itself.
    local pip=(python3 -m pip install --quiet)
    if externally_managed; then
        say "python3 is externally managed (PEP 668): installing moto with --break-system-packages"
        pip+=(--break-system-packages)
    fi
    say "installing moto: ${pip[*]} '$MOTO_REQUIREMENT'"
    "${pip[@]}" "$MOTO_REQUIREMENT"
    # pyenv only exposes new scripts after a rehash; harmless elsewhere.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
}

start_moto() {
    local cmd
    if ! cmd=$(find_moto); then
        install_moto
        cmd=$(find_moto) || die "moto_server still not found after pip install '$MOTO_REQUIREMENT'"
    fi
    local argv
    mapfile -t argv <<<"$cmd"
    say "starting moto at $ENDPOINT (data in memory, lost when it stops; log: $LOG)"
    # Run from / so the server keeps no user directory busy. `exec` keeps $! the server's pid
    # (nohup and setsid exec too: a background job of a script leads no process group).
    (cd / && exec nohup setsid "${argv[@]}" -H "$HOST" -p "$PORT" >"$LOG" 2>&1 </dev/null) &
    echo $! >"$PIDFILE"
}

# ------------------------------------------------------------------------------------------------

if answers_as_ours; then
    running=$(running_server)
    if [ "$running" = unknown ]; then
        say "an S3 server this script did not start already answers at $ENDPOINT with the s3csi credentials; using it"
    else
        say "S3 server already running at $ENDPOINT ($running)"
    fi
    if [ "$running" != unknown ] && [ "$running" != "$SERVER" ]; then
        say "note: you asked for $SERVER; stop the running one first to switch: kill \"\$(cat $PIDFILE)\""
    fi
else
    port_open && die "$HOST:$PORT is in use by something that rejects the s3csi credentials; stop it first"
    mkdir -p "$(dirname "$PIDFILE")"
    case "$SERVER" in
        moto) start_moto ;;
        s3s-fs) start_s3s_fs ;;
    esac
    # Poll until it answers a signed ListBuckets (moto imports a lot of Python: 60 s at most).
    for _ in $(seq 300); do
        answers_as_ours && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "$SERVER exited at startup; see $LOG"
        sleep 0.2
    done
    answers_as_ours || die "$SERVER did not become ready within 60 s; see $LOG"
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

if [ "$(running_server)" = unknown ]; then
    stop_hint="not started by this script (no live process in $PIDFILE); stop it the way it was started"
else
    stop_hint="kill \"\$(cat $PIDFILE)\""
fi
cat <<INFO
S3 endpoint : $ENDPOINT   (path style, region $REGION, server: $(running_server))
credentials : AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY
stop it with: $stop_hint
INFO
