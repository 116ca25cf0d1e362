# bench/lib.sh - helpers the bench scripts share (sourced, not run).
#
# The sourcing script defines log and die, and the variables APT_UPDATED=0,
# LOOPS=() and BENCH_DIR that these helpers use.

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
