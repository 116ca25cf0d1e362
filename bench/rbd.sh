#!/usr/bin/env bash
# bench/rbd.sh - volback against Ceph's own tools on RBD (issue #5).
#
# Run (as root, from anywhere inside the repo):
#     bash bench/rbd.sh
#
# What it does:
#   * starts its own throwaway single-node Ceph cluster with fixtures/ceph.sh
#     in BENCH_DIR/ceph (pools `volumes` and `backups`, mon ports
#     CEPH_MON_PORT/CEPH_MON_V2_PORT, so it never clashes with the test
#     clusters on 6789/6790), installing Ceph and python3-rbd if missing;
#   * writes a configuration with one rbd backend `ceph` with pools
#     volumes and backups (default target ceph:backups), once per copy.verify
#     setting (same catalog), creates a SIZE volume on ceph:volumes, fills it
#     with random data (`volback copy` of a random file, checked with
#     `rbd export | cmp`) and takes the RBD snapshot `bench-src` of it;
#   * case copy (rbd -> local loop device): RUNS interleaved rounds of
#       volback:  volback copy rbd:volumes/IMG@bench-src:conf=CONF /dev/loopN
#       peer:     rbd export volumes/IMG@bench-src - | dd of=/dev/loopN bs=4M
#                 oflag=direct iflag=fullblock
#     onto a loop device (losetup --direct-io=on) over a fresh sparse file
#     each time, caches dropped before each run, every destination compared
#     with the random file (cmp);
#   * case full (rbd -> rbd full backup), RUNS rounds; each round first
#     deletes the previous round's backups, peer images and peer snapshots
#     (untimed), then times, caches dropped before each:
#       volback fast:    volback backup create VOL (default target ceph:backups; rbd fast path)
#       volback generic: the same with --generic (connectors + copy engine)
#       peer:            rbd snap create SRC@sN && rbd create --size SIZE
#                        backups/peer-N && rbd export-diff SRC@sN - |
#                        rbd import-diff - backups/peer-N
#   * case incr (rbd -> rbd incremental): in the same rounds, after the fulls
#     (which are each tool's chain parent; when only `incr` is asked for they
#     still run, timed and shown), overwrites CHANGE_PCT% of the volume with
#     new random data in CHANGE_CHUNK pieces at random CHANGE_ALIGN-aligned
#     non-overlapping offsets (python3-rbd), then times
#       volback fast:    backup create VOL --incremental --parent <its full>
#       volback generic: the same with --generic, on the generic full
#       peer:            rbd snap create SRC@sN+1 && rbd export-diff
#                        --from-snap sN SRC@sN+1 - | rbd import-diff - backups/peer-N
#     so all of them diff the same change against the same state; the
#     volback backups must be incrementals (change_tracking rbd-diff for the
#     fast path, driver for --generic);
#   * the order of the tools rotates from round to round;
#   * at the end restores the last fast-path incremental (volback restore ID
#     --to ceph:volumes --verify) and compares the restored image with the
#     source snapshot that backup was read from (rbd export | cmp), and the
#     peer's last image with the peer's source snapshot the same way;
#   * prints a table of medians, MB/s, bytes read, ratios and PASS/MISS:
#       copy:  volback copy >= 1.0x `rbd export | dd` (ratio = peer s / volback s);
#       incr:  volback fast incremental time <= 0.25x its full backup's time,
#              and its bytes read <= 2 x changed bytes + pieces x map block;
#     plus fast/generic and fast/peer ratios, and the command to reproduce.
#
# Environment:
#   SIZE=1G          volume size (numfmt IEC; multiple of 4 MiB)
#   RUNS=3           rounds (medians reported)
#   CASES="copy full incr"  which cases to run (incr runs the fulls too)
#   VERIFY=          unset: every volback backup row twice, once with the
#                    engine's default for backup.copy.verify (on: a backup
#                    reads back what it wrote) and once with
#                    `copy: {verify: false}`; 1: only the default; 0: only
#                    verify false
#   VOLBACK=path     volback binary; if unset the script runs
#                    `cargo build --release -p volback-engine` and uses
#                    ${CARGO_TARGET_DIR:-target}/release/volback
#   BENCH_DIR=/var/tmp/volback-bench-rbd  scratch dir (a disk, not tmpfs: the
#                    OSD's block file and the loop device's file live there)
#   KEEP=1           keep the random fill file (reused by the next run); the
#                    cluster and everything else go anyway
#   CHANGE_PCT=5     percent of the volume overwritten before the incrementals
#   CHANGE_CHUNK=1M  size of each overwritten piece
#   CHANGE_ALIGN=4K  alignment of the pieces' offsets
#   SEED=n           seed for the changed ranges (default: random, printed)
#   CEPH_MON_PORT=6795 CEPH_MON_V2_PORT=3305  the cluster's mon ports
#   VOLBACK_LOG=warn volback's log filter (its stderr is shown on failures)
#
# Exit status: non-zero if a command failed, a backup was not of the expected
# mode/change tracking, or a destination, restore or peer image differs from
# its source (FAIL). Performance targets are informational (PASS/MISS).

set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- settings ---

SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
CASES=${CASES:-copy full incr}
BENCH_DIR=${BENCH_DIR:-/var/tmp/volback-bench-rbd}
KEEP=${KEEP:-0}
CHANGE_PCT=${CHANGE_PCT:-5}
CHANGE_CHUNK=${CHANGE_CHUNK:-1M}
CHANGE_ALIGN=${CHANGE_ALIGN:-4K}
VERIFY=${VERIFY-}
SEED=${SEED:-$(( (RANDOM << 15) | RANDOM ))}
MON_PORT=${CEPH_MON_PORT:-6795}
MON_V2_PORT=${CEPH_MON_V2_PORT:-3305}
export VOLBACK_LOG=${VOLBACK_LOG:-warn}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CEPH_SH=$REPO_ROOT/fixtures/ceph.sh
ORIG_CMD="$(printf '%q ' "$0" "$@")"

[[ $EUID -eq 0 ]] || die "must run as root (losetup, drop_caches, Ceph daemons)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
[[ $CHANGE_PCT =~ ^[1-9][0-9]?$ ]] || die "CHANGE_PCT must be an integer 1..50"
(( CHANGE_PCT <= 50 )) || die "CHANGE_PCT above 50 leaves no room for non-overlapping random pieces"
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer"
case $VERIFY in
'') VERIFY_SET=(on off) ;;
1|true|on) VERIFY_SET=(on) ;;
0|false|off) VERIFY_SET=(off) ;;
*) die "VERIFY must be unset, 1 or 0" ;;
esac
DO_COPY=0 DO_FULL=0 DO_INCR=0
for c in $CASES; do
    case $c in
    copy) DO_COPY=1 ;;
    full) DO_FULL=1 ;;
    incr) DO_INCR=1 ;;
    *) die "unknown case '$c' (copy, full, incr)" ;;
    esac
done

SIZE_BYTES=$(bytes SIZE "$SIZE")
CHUNK_BYTES=$(bytes CHANGE_CHUNK "$CHANGE_CHUNK")
ALIGN_BYTES=$(bytes CHANGE_ALIGN "$CHANGE_ALIGN")
MiB=$((1024 * 1024))
(( SIZE_BYTES > 0 && SIZE_BYTES % (4 * MiB) == 0 )) ||
    die "SIZE must be a positive multiple of 4 MiB (got $SIZE_BYTES bytes)"
(( ALIGN_BYTES > 0 && ALIGN_BYTES % 512 == 0 )) ||
    die "CHANGE_ALIGN must be a positive multiple of 512 (got $ALIGN_BYTES bytes)"
(( CHUNK_BYTES > 0 && CHUNK_BYTES * 4 <= SIZE_BYTES )) ||
    die "CHANGE_CHUNK must be positive and at most SIZE/4 (got $CHUNK_BYTES bytes)"

# --------------------------------------------------------------- tools -------

APT_UPDATED=0
need_pkg util-linux mount diffutils coreutils python3
if ! command -v ceph-mon >/dev/null || ! command -v rbd >/dev/null; then
    bash "$CEPH_SH" install
fi
need_pkg python3-rbd python3-rados
# The Debian packages' interpreter: a python3 earlier in PATH (pyenv, venv)
# does not see their modules.
PY_RBD=/usr/bin/python3
"$PY_RBD" -c 'import rados, rbd' 2>/dev/null ||
    die "$PY_RBD cannot import rados and rbd (python3-rados, python3-rbd)"

# ------------------------------------------------------- scratch + cleanup ---

[[ $BENCH_DIR != *[[:space:]]* ]] || die "BENCH_DIR must not contain white space"
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
[[ $BENCH_DIR != / ]] || die "BENCH_DIR must not be /"
FSTYPE=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
[[ $FSTYPE != tmpfs && $FSTYPE != ramfs ]] ||
    die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; pick a directory on a disk"

CEPH_DIR=$BENCH_DIR/ceph
RAND_FILE=$BENCH_DIR/random-fill.bin
DST_FILE=$BENCH_DIR/dst.img
RESULTS=$BENCH_DIR/results.tsv
TOOL_LOG=$BENCH_DIR/tool.log
OUT_JSON=$BENCH_DIR/out.json
CATALOG=$BENCH_DIR/catalog.db
EXPORT_FILE=$BENCH_DIR/export.img
CEPH_STARTED=0
LOOPS=()

exec 3>&1 4>&2   # cleanup's messages must not vanish into a tool's log

# PIDs of processes running with this script's cluster conf: ceph.sh stops
# only the daemons it recorded, and one being launched is not recorded yet.
strays() {
    local f pid
    for f in /proc/[0-9]*/cmdline; do
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        [[ $pid != "$$" ]] || continue
        tr '\0' ' ' 2>/dev/null <"$f" | grep -qF -- "--conf $CEPH_DIR/ceph.conf " && echo "$pid"
    done
}

stop_strays() {
    local pids pid i
    pids=$(strays)
    [[ -n $pids ]] || return 0
    echo "rbd.sh: stopping daemons of $CEPH_DIR that ceph.sh did not record: $pids" >&2
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done
    for i in {1..100}; do
        [[ -n $(strays) ]] || return 0
        sleep 0.2
    done
    for pid in $(strays); do kill -KILL "$pid" 2>/dev/null; done
    sleep 1
}

cleanup() {
    local rc=$? dev left
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    for dev in "${LOOPS[@]}"; do detach_retry "$dev"; done
    for dev in $(our_loops); do detach_retry "$dev"; done
    # The cluster goes with everything in it: the volback volumes, their
    # snapshots, the backups and the peer's images.
    if (( CEPH_STARTED )) || [[ -e $CEPH_DIR ]]; then
        KEEP=0 bash "$CEPH_SH" stop "$CEPH_DIR" 2>&1 | sed 's/^/   | /'
        stop_strays
    fi
    rm -f -- "$DST_FILE" "$RESULTS" "$TOOL_LOG" "$OUT_JSON" "$EXPORT_FILE" \
        "$CATALOG" "$CATALOG-wal" "$CATALOG-shm" "$BENCH_DIR"/cfg-*.yaml
    if [[ $KEEP != 1 ]]; then
        rm -f -- "$RAND_FILE" "$RAND_FILE.ok"
        rmdir -- "$BENCH_DIR" 2>/dev/null || true
    else
        echo "KEEP=1: random fill kept in $RAND_FILE"
    fi
    left=$( { losetup -a | grep -F "$BENCH_DIR/"; pgrep -a ceph- | grep -F "$CEPH_DIR/"; } || true)
    if [[ -n $left ]]; then
        echo "rbd.sh: WARNING: left behind:" >&2
        echo "$left" >&2
        (( rc )) || rc=3
    else
        echo "cleanup: no bench loop devices or Ceph daemons left (losetup -a, pgrep -a ceph- checked)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT    # `exit` runs the EXIT trap, i.e. cleanup
trap 'exit 143' TERM

# Room: the random file, the loop destination, the OSD's data (volume,
# snapshots of the changes, up to 2 x verify settings + 1 full copies per
# round, a restore), an export file, slack.
need_room $(( SIZE_BYTES * (2 + 2 * ${#VERIFY_SET[@]} + 1 + 4) + 2048 * MiB ))

ensure_volback

# ------------------------------------------------------------------ ceph -----

# A cluster left by an earlier, killed run: stop it (ceph.sh only touches a
# directory it made, and only the PIDs it recorded there).
if [[ -e $CEPH_DIR ]]; then
    log "stopping a cluster left in $CEPH_DIR by an earlier run"
    KEEP=0 bash "$CEPH_SH" stop "$CEPH_DIR" 2>&1 | sed 's/^/   | /'
fi
log "starting a Ceph cluster in $CEPH_DIR (mon ports $MON_V2_PORT/$MON_PORT, pools volumes backups)"
CEPH_STARTED=1
# In a session of its own: a Ctrl-C to the script's process group must not
# stop ceph.sh between launching a daemon and recording its PID (the script
# waits for the start to finish, then its EXIT trap stops the cluster).
out=$(CEPH_POOLS="volumes backups" CEPH_MON_PORT=$MON_PORT CEPH_MON_V2_PORT=$MON_V2_PORT \
      CEPH_AUTH=none CEPH_WITH_MGR=0 setsid --wait bash "$CEPH_SH" start "$CEPH_DIR" \
      </dev/null 2>"$TOOL_LOG") ||
    die_log "could not start the Ceph cluster"
CONF=${out#CEPH_CONF=}
[[ -f $CONF ]] || die "ceph.sh start printed '$out', not CEPH_CONF=<conf>"
log "cluster up: $CONF"

# Bounded: a dead mon makes clients retry forever. --foreground keeps the
# command in the script's process group, so a Ctrl-C reaches it.
rbd_() { timeout --foreground 600 rbd -c "$CONF" "$@"; }

# ------------------------------------------------------------- configuration -

declare -A CFG
for v in "${VERIFY_SET[@]}"; do
    CFG[$v]=$BENCH_DIR/cfg-$v.yaml
    copy_yaml=
    [[ $v == off ]] && copy_yaml=$'\n  copy:\n    verify: false'
    cat >"${CFG[$v]}" <<EOF
# bench/rbd.sh (backup.copy.verify: $([[ $v == on ]] && echo "engine default" || echo false))
backends:
  - name: ceph
    driver: rbd
    options: {conf: $CONF, connect_timeout: 30}
    pools: {volumes: volumes, backups: backups}
backup:
  default_target: ceph:backups
  catalog: $CATALOG$copy_yaml
EOF
    "$VOLBACK" --config "${CFG[$v]}" check-config >"$TOOL_LOG" 2>&1 ||
        die_log "check-config failed for ${CFG[$v]}"
done
CFG0=${CFG[${VERIFY_SET[0]}]}

vb() { timeout --foreground 900 "$VOLBACK" --config "$CFG0" "$@"; }

# Runs volback with config of verify setting $1; stdout to $OUT_JSON,
# stderr to $TOOL_LOG; on failure shows the log and returns 1.
vb_json() { # vb_json VERIFY ARGS...
    local v=$1
    shift
    if timeout --foreground 900 "$VOLBACK" --config "${CFG[$v]}" "$@" >"$OUT_JSON" 2>"$TOOL_LOG"; then
        return 0
    fi
    echo "!! FAIL: volback $* exited non-zero:" >&2
    show_tool_log
    return 1
}

# Fields of a backup record in $OUT_JSON:
# id mode change_tracking bytes_read bytes_written map_block_size source_snapshot_id
backup_fields() {
    python3 - "$OUT_JSON" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["id"], d["mode"], d["change_tracking"], d["bytes_read"], d["bytes_written"],
      d["map_block_size"], d.get("source_snapshot_id") or "-")
EOF
}

# ----------------------------------------------------------- random fill -----

want_mark="size=$SIZE_BYTES v=1"
if [[ -f $RAND_FILE && -f $RAND_FILE.ok && $(stat -c %s "$RAND_FILE") == "$SIZE_BYTES" &&
      $(cat "$RAND_FILE.ok") == "$want_mark" ]]; then
    log "reusing random fill $RAND_FILE"
else
    rm -f -- "$RAND_FILE" "$RAND_FILE.ok"
    log "generating $SIZE_BYTES bytes of random fill ($RAND_FILE)"
    head -c "$SIZE_BYTES" /dev/urandom >"$RAND_FILE"
    echo "$want_mark" >"$RAND_FILE.ok"
fi

# ---------------------------------------------------------------- volume -----

vb volume create ceph:volumes --size "$SIZE_BYTES" --name bench >"$OUT_JSON" 2>"$TOOL_LOG" ||
    die_log "volume create failed"
VOL=$(tail -1 "$OUT_JSON")           # ceph:volumes/<id>
VOL_ID=${VOL##*/}
IMG=volumes/volume-$VOL_ID
rbd_ info "$IMG" >/dev/null 2>&1 || die "volume create printed '$VOL' but $IMG does not exist"
log "volume $VOL (RBD image $IMG); filling it with random data"
timeout --foreground 900 "$VOLBACK" copy --progress none "$RAND_FILE" "rbd:$IMG:conf=$CONF" >"$TOOL_LOG" 2>&1 ||
    die_log "filling $IMG failed"
rbd_ snap create "$IMG@bench-src" >"$TOOL_LOG" 2>&1 ||
    die_log "rbd snap create $IMG@bench-src failed"
rbd_ export --no-progress "$IMG@bench-src" - 2>"$TOOL_LOG" | cmp -n "$SIZE_BYTES" - "$RAND_FILE" >>"$TOOL_LOG" 2>&1 ||
    die_log "$IMG@bench-src does not hold the random fill"
log "source snapshot $IMG@bench-src holds the random fill (rbd export | cmp)"

# ----------------------------------------------------------------- runs ------

: >"$RESULTS"
FAILED=0

# Fields of result: CASE TOOL VERIFY RUN SECS BYTES_READ STATUS [CHANGED PIECES MAPBLOCK]

log "SIZE=$SIZE ($SIZE_BYTES bytes) RUNS=$RUNS CASES='$CASES' backup.copy.verify: ${VERIFY_SET[*]}" \
    "(on = engine default)"
log "volback: $VOLBACK ($("$VOLBACK" --version))"
log "ceph: $(rbd --version | cut -d' ' -f1-3)"
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (others' work skews the times)"

# ------------------------------------------------ case copy: rbd -> loop -----

DST_LOOP=
if (( DO_COPY )); then
    echo
    log "case copy: rbd:$IMG@bench-src -> loop device over a sparse file (direct I/O)"
    SRC_SPEC="rbd:$IMG@bench-src:conf=$CONF"
    for (( run = 1; run <= RUNS; run++ )); do
        ROT=$(( (run - 1) % 2 ))
        rotate volback peer
        for tool in "${ORDER[@]}"; do
            reset_dst
            drop_caches
            status=OK
            read_b=-
            t0=$EPOCHREALTIME
            if [[ $tool == volback ]]; then
                timeout --foreground 900 "$VOLBACK" copy --progress json "$SRC_SPEC" "$DST_LOOP" \
                    >"$OUT_JSON" 2>"$TOOL_LOG" || status=FAIL
            else
                { rbd_ export --no-progress "$IMG@bench-src" - |
                  dd of="$DST_LOOP" bs=4M oflag=direct iflag=fullblock status=none; } \
                    >"$OUT_JSON" 2>"$TOOL_LOG" || status=FAIL
            fi
            t1=$EPOCHREALTIME
            secs=$(elapsed "$t0" "$t1")
            if [[ $status == FAIL ]]; then
                fail "copy run $run: $tool exited non-zero:"
                show_tool_log
            else
                if [[ $tool == volback ]]; then
                    read_b=$(python3 -c '
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print([e for e in s if e.get("event") == "summary"][-1]["bytes_read"])' "$OUT_JSON") || read_b=-
                fi
                blockdev --flushbufs "$DST_LOOP"
                drop_caches
                if ! cmp -n "$SIZE_BYTES" "$RAND_FILE" "$DST_LOOP" >"$TOOL_LOG" 2>&1; then
                    status=FAIL
                    fail "copy run $run: $DST_LOOP differs from the source after $tool:"
                    show_tool_log
                fi
            fi
            printf '   copy  run %d/%d  %-19s %8.3f s  read %12s  %s\n' \
                "$run" "$RUNS" "$tool" "$secs" "$read_b" "$status"
            result copy "$tool" - "$run" "$secs" "$read_b" "$status"
        done
    done
    drop_dst
    rm -f -- "$DST_FILE"
fi

# ---------------------------------------- cases full + incr: rbd -> rbd ------

# Overwrites CHANGE_PCT% of the volume's image with new random data in CHUNK
# pieces at random ALIGN-aligned non-overlapping offsets, through librbd;
# prints "changed_bytes pieces".
change_volume() { # change_volume SEED
    "$PY_RBD" - "$CONF" "${IMG%%/*}" "${IMG#*/}" "$SIZE_BYTES" "$CHUNK_BYTES" "$ALIGN_BYTES" \
        "$CHANGE_PCT" "$1" <<'EOF'
import bisect, os, random, sys
import rados, rbd
conf, pool, image = sys.argv[1:4]
size, chunk, align, pct, seed = map(int, sys.argv[4:])
rng = random.Random(seed)
want = -(-size * pct // (100 * chunk))      # ceil(pct% of size / chunk)
slots = (size - chunk) // align + 1
offs, tries = [], 0
while len(offs) < want:
    tries += 1
    if tries > 1000 * want:
        sys.exit("change_volume: cannot place the pieces without overlap")
    off = rng.randrange(slots) * align
    i = bisect.bisect_left(offs, off)
    if i < len(offs) and offs[i] < off + chunk:
        continue
    if i > 0 and offs[i - 1] + chunk > off:
        continue
    offs.insert(i, off)
cluster = rados.Rados(conffile=conf)
cluster.connect(timeout=30)
try:
    ioctx = cluster.open_ioctx(pool)
    try:
        with rbd.Image(ioctx, image) as img:
            for off in offs:
                data = os.urandom(chunk)
                if img.write(data, off) != chunk:
                    sys.exit(f"change_volume: short write at {off}")
            img.flush()
    finally:
        ioctx.close()
finally:
    cluster.shutdown()
print(len(offs) * chunk, len(offs))
EOF
}

# Deletes what a round made: volback backups (newest first), the peer's
# image and its snapshots on the source.
declare -a ROUND_BACKUPS=() ROUND_PEER_IMAGES=() ROUND_PEER_SNAPS=()
clear_round() {
    local i
    for (( i = ${#ROUND_BACKUPS[@]} - 1; i >= 0; i-- )); do
        vb backup delete "${ROUND_BACKUPS[i]}" >"$TOOL_LOG" 2>&1 ||
            die_log "backup delete ${ROUND_BACKUPS[i]} failed"
    done
    for i in "${ROUND_PEER_IMAGES[@]}"; do
        rbd_ snap purge "$i" >"$TOOL_LOG" 2>&1 && rbd_ rm "$i" >>"$TOOL_LOG" 2>&1 ||
            die_log "removing peer image $i failed"
    done
    for i in "${ROUND_PEER_SNAPS[@]}"; do
        rbd_ snap rm "$i" >"$TOOL_LOG" 2>&1 ||
            die_log "rbd snap rm $i failed"
    done
    ROUND_BACKUPS=() ROUND_PEER_IMAGES=() ROUND_PEER_SNAPS=()
}

# Runs one volback backup; checks mode and change tracking; records it.
# Sets B_ID (empty on failure) and B_SRC_SNAP.
volback_backup() { # volback_backup CASE KIND(fast|generic) VERIFY RUN WANT_MODE WANT_TRACK ARGS...
    local case=$1 kind=$2 v=$3 run=$4 want_mode=$5 want_track=$6 t0 t1 secs status=OK
    shift 6
    local flags=()
    [[ $kind == generic ]] && flags+=(--generic)
    B_ID= B_SRC_SNAP=
    drop_caches
    t0=$EPOCHREALTIME
    vb_json "$v" backup create "$VOL" "${flags[@]}" "$@" --json --progress none || status=FAIL
    t1=$EPOCHREALTIME
    secs=$(elapsed "$t0" "$t1")
    local id=- mode=- track=- rd=- wr=- mb=- snap=-
    if [[ $status == OK ]]; then
        read -r id mode track rd wr mb snap < <(backup_fields)
        ROUND_BACKUPS+=("$id")
        if [[ $mode != "$want_mode" || $track != "$want_track" ]]; then
            status=FAIL
            fail "$case run $run: volback $kind (verify $v) made mode=$mode change_tracking=$track," \
                "expected mode=$want_mode change_tracking=$want_track"
        else
            B_ID=$id B_SRC_SNAP=$snap
        fi
    else
        FAILED=1
    fi
    MAP_BLOCK=$mb
    printf '   %-4s  run %d/%d  %-19s %8.3f s  read %12s  written %12s  %s %s  %s\n' \
        "$case" "$run" "$RUNS" "volback-$kind/$v" "$secs" "$rd" "$wr" "$mode" "$track" "$status"
    result "$case" "volback $kind" "$v" "$run" "$secs" "$rd" "$status" "${CHANGED:-0}" "${PIECES:-0}" "$mb"
}

# Runs a peer command line (bash -c, pipefail) timed; records it.
peer_run() { # peer_run CASE RUN COMMAND
    local case=$1 run=$2 cmd=$3 t0 t1 secs status=OK
    drop_caches
    t0=$EPOCHREALTIME
    bash -c "set -euo pipefail; $cmd" >"$OUT_JSON" 2>"$TOOL_LOG" || status=FAIL
    t1=$EPOCHREALTIME
    secs=$(elapsed "$t0" "$t1")
    if [[ $status == FAIL ]]; then
        fail "$case run $run: peer failed: $cmd"
        show_tool_log
    fi
    printf '   %-4s  run %d/%d  %-19s %8.3f s  %s\n' "$case" "$run" "$RUNS" "peer" "$secs" "$status"
    result "$case" peer - "$run" "$secs" - "$status" "${CHANGED:-0}" "${PIECES:-0}" -
    [[ $status == OK ]]
}

RBD="rbd -c $CONF"
LAST_FAST_INCR= LAST_FAST_INCR_SNAP= LAST_PEER_IMAGE= LAST_PEER_SNAP=
MAP_BLOCK=-
if (( DO_FULL || DO_INCR )); then
    echo
    log "cases full$( (( DO_INCR )) && echo ' + incr'): $VOL -> ceph:backups (same cluster, pool backups)"
    (( DO_INCR )) && log "changes: $CHANGE_PCT% in $CHANGE_CHUNK pieces at $CHANGE_ALIGN-aligned offsets, SEED=$SEED"
    TOOLS=()
    for v in "${VERIFY_SET[@]}"; do TOOLS+=("fast:$v" "generic:$v"); done
    TOOLS+=(peer)
    for (( run = 1; run <= RUNS; run++ )); do
        clear_round
        CHANGED=0 PIECES=0
        ROT=$(( (run - 1) % ${#TOOLS[@]} ))
        rotate "${TOOLS[@]}"
        declare -A FULL_ID=()
        peer_img=backups/peer-$run peer_full_ok=0
        for t in "${ORDER[@]}"; do
            if [[ $t == peer ]]; then
                ROUND_PEER_SNAPS+=("$IMG@peer-$run-full")
                ROUND_PEER_IMAGES+=("$peer_img")
                peer_run full "$run" "$RBD snap create $IMG@peer-$run-full &&
                    $RBD create --size ${SIZE_BYTES}B $peer_img &&
                    $RBD export-diff --no-progress $IMG@peer-$run-full - |
                    $RBD import-diff --no-progress - $peer_img" &&
                    peer_full_ok=1
            else
                kind=${t%%:*} v=${t#*:}
                want=full
                [[ $kind == fast ]] && want=rbd-diff
                volback_backup full "$kind" "$v" "$run" full "$want"
                [[ -n $B_ID ]] && FULL_ID[$t]=$B_ID
            fi
        done
        (( DO_INCR )) || continue

        read -r CHANGED PIECES < <(change_volume $(( SEED + run ))) ||
            die "changing the volume failed"
        printf '   incr  run %d/%d  changed %d bytes in %d pieces\n' "$run" "$RUNS" "$CHANGED" "$PIECES"
        for t in "${ORDER[@]}"; do
            if [[ $t == peer ]]; then
                if (( ! peer_full_ok )); then
                    fail "incr run $run: peer has no full image to build on"
                    result incr peer - "$run" 0 - FAIL "$CHANGED" "$PIECES" -
                    continue
                fi
                ROUND_PEER_SNAPS+=("$IMG@peer-$run-incr")
                peer_run incr "$run" "$RBD snap create $IMG@peer-$run-incr &&
                    $RBD export-diff --no-progress --from-snap peer-$run-full $IMG@peer-$run-incr - |
                    $RBD import-diff --no-progress - $peer_img" &&
                    { LAST_PEER_IMAGE=$peer_img LAST_PEER_SNAP=peer-$run-incr; }
            else
                kind=${t%%:*} v=${t#*:}
                want=driver
                [[ $kind == fast ]] && want=rbd-diff
                if [[ -z ${FULL_ID[$t]:-} ]]; then
                    fail "incr run $run: volback $kind (verify $v) has no full backup to build on"
                    result incr "volback $kind" "$v" "$run" 0 - FAIL "$CHANGED" "$PIECES" -
                    continue
                fi
                volback_backup incr "$kind" "$v" "$run" incremental "$want" \
                    --incremental --parent "${FULL_ID[$t]}"
                if [[ $kind == fast && -n $B_ID ]]; then
                    LAST_FAST_INCR=$B_ID LAST_FAST_INCR_SNAP=$B_SRC_SNAP
                fi
            fi
        done
    done
fi

# ------------------------------------------------------------ verification ---

# Compares image/snapshot $1 with $2, both through rbd export.
same_images() { # same_images WHAT SPEC_EXPECTED SPEC_ACTUAL
    rm -f -- "$EXPORT_FILE"
    if rbd_ export --no-progress "$3" "$EXPORT_FILE" >"$TOOL_LOG" 2>&1 &&
       rbd_ export --no-progress "$2" - 2>>"$TOOL_LOG" | cmp - "$EXPORT_FILE" >>"$TOOL_LOG" 2>&1; then
        log "  $1: $3 identical to $2 ($(stat -c %s "$EXPORT_FILE") bytes)"
        rm -f -- "$EXPORT_FILE"
        return 0
    fi
    fail "$1: $3 differs from $2 (or an export failed):"
    show_tool_log
    rm -f -- "$EXPORT_FILE"
    return 1
}

if (( DO_INCR )); then
    echo
    if [[ -n $LAST_FAST_INCR && $LAST_FAST_INCR_SNAP != - ]]; then
        log "restoring the last fast-path incremental ($LAST_FAST_INCR) to ceph:volumes (--verify)"
        if vb_json "${VERIFY_SET[0]}" restore "$LAST_FAST_INCR" --to ceph:volumes --verify --json --progress none; then
            r_vol=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["volume"])' "$OUT_JSON")
            if same_images "restore check" "$IMG@snapshot-$LAST_FAST_INCR_SNAP" "volumes/volume-$r_vol"; then
                result check restore - 0 0 - OK
            else
                result check restore - 0 0 - FAIL
            fi
        else
            FAILED=1
            result check restore - 0 0 - FAIL
        fi
    else
        fail "no fast-path incremental to restore"
        result check restore - 0 0 - FAIL
    fi
    if [[ -n $LAST_PEER_IMAGE ]]; then
        if same_images "peer check" "$IMG@$LAST_PEER_SNAP" "$LAST_PEER_IMAGE@$LAST_PEER_SNAP"; then
            result check peer - 0 0 - OK
        else
            result check peer - 0 0 - FAIL
        fi
    fi
fi

# ------------------------------------------------------------------ table ----

echo
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RESULTS" "$SIZE_BYTES" "$CHANGE_PCT" "$CHANGE_CHUNK" "$CHANGE_ALIGN" "${VERIFY_SET[*]}" <<'EOF'
import statistics, sys
from collections import defaultdict

path, size, pct, chunk, align, verify_set = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rows, order, checks = defaultdict(list), [], {}
for line in open(path):
    f = line.rstrip("\n").split("\t")
    f += [""] * (10 - len(f))
    case, tool, v, run, secs, rd, status, changed, pieces, mb = f
    if case == "check":
        checks[tool] = status
        continue
    key = (case, tool, v)
    if key not in rows:
        order.append(key)
    rows[key].append(dict(secs=float(secs), rd=None if rd in ("-", "") else int(rd),
                          ok=status == "OK", changed=int(changed or 0), pieces=int(pieces or 0),
                          mb=None if mb in ("-", "") else int(mb)))

def ok_rows(key):
    return [r for r in rows.get(key, []) if r["ok"]]

def med(key, k="secs"):
    vals = [r[k] for r in ok_rows(key) if r[k] is not None]
    return statistics.median(vals) if vals else None

def fails(key):
    return sum(not r["ok"] for r in rows.get(key, []))

def fmt(x, spec):
    return "-" if x is None else format(round(x) if spec == "d" else x, spec)

TOOLNAME = {
    ("copy", "volback"): "volback copy",
    ("copy", "peer"): "rbd export|dd",
    ("full", "peer"): "rbd exp-diff|imp",
    ("incr", "peer"): "rbd exp-diff|imp",
}
nruns = max((len(v) for v in rows.values()), default=0)
print(f"Results: {size} bytes ({size / 2**30:g} GiB) RBD image of random data, one single-node "
      f"Ceph cluster (bluestore on a sparse file), median of {nruns} run(s); MB = 10^6 bytes")
print(f"  backup.copy.verify: {', '.join('on (engine default)' if v == 'on' else 'off (copy: {verify: false})' for v in verify_set.split())}"
      "  [verify column]")
print("  copy: rbd -> loop device (direct I/O); full/incr: rbd pool volumes -> pool backups")
print(f"  incr: {pct}% of the volume rewritten in {chunk} pieces at {align}-aligned offsets before each incremental;")
print("        incr MB/s = changed bytes / s; bytes read = the engine's bytes_read (source reads only)")
print("  vs peer = peer median s / tool median s (>1: faster than the peer)")
print()
hdr = (f"{'case':<5} {'tool':<17} {'verify':<6} {'median s':>9} {'MB/s':>8} {'bytes read':>12} "
       f"{'vs peer':>8}  {'target':<26} {'result':<6}")
print(hdr)
print("-" * len(hdr))
targets_ok = True
for key in order:
    case, tool, v = key
    s = med(key)
    name = TOOLNAME.get((case, tool), tool)
    nf = fails(key)
    status = f"FAIL({nf})" if nf else ""
    if s is None:
        print(f"{case:<5} {name:<17} {v:<6} {'-':>9} {'-':>8} {'-':>12} {'-':>8}  {'':<26} {status}")
        continue
    amount = size if case != "incr" else statistics.median(r["changed"] for r in ok_rows(key))
    mbps = amount / 1e6 / s if s > 0 else float("inf")
    rd = med(key, "rd")
    peer = med((case, "peer", "-"))
    vs = f"{peer / s:.2f}x" if (peer is not None and tool != "peer") else "-"
    tgt, res, extra = "", status, []
    if case == "copy" and tool == "volback":
        tgt = ">=1.0x rbd export"
        if peer is not None:
            res = (res + " " if res else "") + ("PASS" if peer / s >= 1.0 else "MISS")
    if case == "incr" and tool == "volback fast":
        full = med(("full", tool, v))
        if full is not None:
            ratio = s / full
            tgt = f"incr/full {ratio:.3f} <=0.25"
            res = (res + " " if res else "") + ("PASS" if ratio <= 0.25 else "MISS")
        rs = ok_rows(key)
        if rs and rs[0]["mb"]:
            bounds = [2 * r["changed"] + r["pieces"] * r["mb"] for r in rs]
            within = all(r["rd"] is not None and r["rd"] <= b for r, b in zip(rs, bounds))
            bound = statistics.median(bounds)
            extra.append((f"read {fmt(rd and rd / 2**20, '.1f')}<={bound / 2**20:.1f} MiB",
                          "PASS" if within else "MISS"))
    print(f"{case:<5} {name:<17} {v:<6} {s:>9.3f} {mbps:>8.1f} {fmt(rd, 'd'):>12} {vs:>8}  {tgt:<26} {res}")
    for t, r in extra:
        print(f"{'':<5} {'':<17} {'':<6} {'':>9} {'':>8} {'':>12} {'':>8}  {t:<26} {r}")

# Ratios.
lines = []
for v in verify_set.split():
    for case in ("full", "incr"):
        fast, gen, peer = (med((case, t, x)) for t, x in
                           (("volback fast", v), ("volback generic", v), ("peer", "-")))
        if fast is None:
            continue
        parts = []
        if gen is not None:
            parts.append(f"fast vs generic {gen / fast:.2f}x")
        if peer is not None:
            parts.append(f"fast vs peer {peer / fast:.2f}x")
        if parts:
            lines.append(f"  {case:<4} verify {v:<3}: " + ", ".join(parts))
    for t in ("volback fast", "volback generic"):
        f, i = med(("full", t, v)), med(("incr", t, v))
        if f and i is not None:
            lines.append(f"  incr/full time, {t}, verify {v}: {i / f:.3f}")
f, i = med(("full", "peer", "-")), med(("incr", "peer", "-"))
if f and i is not None:
    lines.append(f"  incr/full time, peer: {i / f:.3f}")
if lines:
    print()
    print("Ratios (x = other tool's s / fast path's s; >1: the fast path is faster):")
    print("\n".join(lines))
incr_rows = [r for (c, _, _), rs in rows.items() if c == "incr" for r in rs]
if incr_rows:
    print(f"  changed per incremental: median {statistics.median(r['changed'] for r in incr_rows) / 2**20:.1f} MiB"
          f" in {statistics.median(r['pieces'] for r in incr_rows):g} pieces")
print()
bad = [k for k in order if fails(k)] + [c for c, s in checks.items() if s != "OK"]
if bad:
    print("CORRECTNESS: FAIL (see the FAIL rows and messages above)")
else:
    done = ["every loop destination matched the source"] if any(k[0] == "copy" for k in order) else []
    if "restore" in checks:
        done.append("the last fast-path incremental restored identical to its source snapshot")
    if "peer" in checks:
        done.append("the peer's last image matched its source snapshot")
    if any(k[0] in ("full", "incr") for k in order):
        done.append("every volback backup was of the expected mode and change tracking")
    print("CORRECTNESS: OK (" + "; ".join(done) + ")")
EOF

echo
echo "reproduce: SIZE=$SIZE RUNS=$RUNS CASES='$CASES' VERIFY=${VERIFY} CHANGE_PCT=$CHANGE_PCT" \
    "CHANGE_CHUNK=$CHANGE_CHUNK CHANGE_ALIGN=$CHANGE_ALIGN SEED=$SEED VOLBACK=$VOLBACK bash $ORIG_CMD"

if (( FAILED )); then
    echo "rbd.sh: at least one command failed or a check did not match (see FAIL above)" >&2
    exit 1
fi
