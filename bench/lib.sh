# bench/lib.sh - helpers the bench scripts share (sourced, not run).
#
# The sourcing script sets the variables these helpers use: APT_UPDATED=0,
# LOOPS=(), BENCH_DIR, REPO_ROOT, and where it uses them TOOL_LOG (a tool's
# output), RESULTS, FAILED, ROT, DST_FILE, DST_LOOP and SIZE_BYTES.

die() { echo "${0##*/}: error: $*" >&2; exit 2; }
log() { echo "== $*"; }

show_tool_log() { sed 's/^/   | /' "$TOOL_LOG" >&2; } # indented, on stderr
die_log() { show_tool_log; die "$@"; }                  # die MESSAGE after TOOL_LOG

fail() { echo "!! FAIL: $*" >&2; FAILED=1; }

result() { # result FIELD...: one tab-separated line of RESULTS
    local IFS=$'\t'
    echo "$*" >>"$RESULTS"
}

# Rotates "$@" left by $ROT positions; sets ORDER.
rotate() {
    local n=$# i a=("$@")
    ORDER=()
    for (( i = 0; i < n; i++ )); do ORDER+=("${a[(i + ROT) % n]}"); done
}

elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; } # elapsed T0 T1: seconds

need_room() { # need_room BYTES: die unless BENCH_DIR has that much free
    local avail
    avail=$(df -B1 --output=avail "$BENCH_DIR" | tail -1 | tr -d ' ')
    (( avail >= $1 )) ||
        die "need about $(numfmt --to=iec "$1") free in $BENCH_DIR, have $(numfmt --to=iec "$avail")"
}

# VOLBACK, or the release binary built now (under CARGO_TARGET_DIR if set).
# Call it after the traps are set, so an interrupted build still cleans up.
ensure_volback() {
    if [[ -z ${VOLBACK:-} ]]; then
        log "building volback (cargo build --release -p volback-engine)"
        (cd "$REPO_ROOT" && cargo build --release -p volback-engine)
        local tdir=${CARGO_TARGET_DIR:-target}
        [[ $tdir == /* ]] || tdir=$REPO_ROOT/$tdir
        VOLBACK=$tdir/release/volback
    fi
    [[ -x $VOLBACK ]] || die "volback binary not found or not executable: $VOLBACK"
}

bytes() { # bytes NAME VALUE: IEC size -> bytes
    numfmt --from=iec "$2" 2>/dev/null || die "cannot parse $1=$2"
}

need() { # need COMMAND PACKAGE: install PACKAGE when COMMAND is missing
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    if (( ! APT_UPDATED )); then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

need_pkg() { # need_pkg PACKAGE...: apt-get install those not installed
    local p missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    (( ${#missing[@]} )) || return 0
    log "installing ${missing[*]}"
    if (( ! APT_UPDATED )); then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

attach() { # attach FILE [extra losetup flags]; sets ATTACHED, adds it to LOOPS
    ATTACHED=$(losetup --find --show --direct-io=on "${@:2}" "$1")
    LOOPS+=("$ATTACHED")
}

detach_retry() { # detach_retry DEV
    local i
    for i in 1 2 3 4 5 6; do
        losetup -d "$1" 2>/dev/null && return 0
        # Already gone (e.g. autoclear) counts as detached.
        losetup "$1" >/dev/null 2>&1 || return 0
        sleep 0.5
    done
    echo "${0##*/}: WARNING: could not detach $1" >&2
    return 1
}

# Loop devices whose backing file is under BENCH_DIR (also "(deleted)" ones).
our_loops() {
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v p="$BENCH_DIR/" 'index($2, p) == 1 { print $1 }'
}

drop_dst() { # detach the destination loop device DST_LOOP and forget it
    local keep=() d
    [[ -n $DST_LOOP ]] || return 0
    detach_retry "$DST_LOOP" || die "cannot detach $DST_LOOP"
    for d in "${LOOPS[@]}"; do [[ $d == "$DST_LOOP" ]] || keep+=("$d"); done
    LOOPS=("${keep[@]}")
    DST_LOOP=
}

reset_dst() { # a fresh sparse DST_FILE of SIZE_BYTES, attached as DST_LOOP
    drop_dst
    rm -f -- "$DST_FILE"
    truncate -s "$SIZE_BYTES" "$DST_FILE"
    attach "$DST_FILE"
    DST_LOOP=$ATTACHED
}
