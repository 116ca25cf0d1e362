#!/usr/bin/env bash
# bench/iscsi.sh - volback's userspace iSCSI initiator against libiscsi (issue #4).
#
# Run (as root, from anywhere inside the repo):
#     bash bench/iscsi.sh
#
# What it does:
#   * installs what is missing: tgt and libiscsi-bin (fixtures/tgt.sh install),
#     qemu-utils and qemu-block-extra (qemu's libiscsi block driver, for
#     `qemu-img convert iscsi://...`), time (GNU /usr/bin/time), diffutils, python3;
#   * starts its own throwaway tgtd with `fixtures/tgt.sh start BENCH_DIR/tgtd`
#     (first free port of 127.0.0.1:3261..3299, or TGT_PORT) and creates target 1
#     (IQN below) with
#       LUN 1: backed by BENCH_DIR/lun1.img, SIZE bytes of random data (read, copy);
#       LUN 2: backed by BENCH_DIR/lun2.img, a sparse file emptied before every
#              write run (truncate to 0, then to SIZE; case write only);
#     bound to every initiator address, and applies TGT_PARAMS to the target with
#     `tgtadm --mode target --op update`. All tools talk to the same target with
#     the same settings (printed); each initiator negotiates them against its own
#     offers (volback's negotiated values are printed too). tgtd's defaults
#     allow no header/data digests, so every tool runs without CRC32C;
#   * NOTE: tgt does buffered I/O on its backing files, so what a tool reads
#     comes from the page cache once read: the LUN is effectively served from
#     memory. Caches are dropped before every run anyway (sync; drop_caches) and,
#     with WARM=1 (default), lun1.img is then read once into the page cache, so
#     every read/copy run, and every pass of iscsi-perf (which reads the LUN over
#     and over), sees the same state: a LUN in tgtd's page cache. WARM=0 leaves
#     the cache cold: then volback's single pass reads from disk while
#     iscsi-perf's later passes hit the cache (unfair to volback);
#   * preflight (untimed): checks the LUN's size (iscsi-readcapacity16), that
#     qemu-img can open iscsi:// URLs, and computes the reference checksum of
#     lun1.img with `volback read FILE` (local); one warm-up
#     `volback read iscsi://...` must return the same checksum;
#   * RUNS rounds; in each the cases below run in this order, the order of the
#     two tools within a case rotating from round to round (interleaved runs):
#     case read (LUN 1, BLOCK bytes per request, QD requests in flight):
#       volback:    volback read iscsi://127.0.0.1:PORT/IQN/1 --block-size BLOCK
#                   --queue-depth QD --sparse never --progress json, READ_PASSES
#                   times in a row, a process each (throughput = the sum of
#                   the summaries' bytes_read / the sum of their elapsed_s,
#                   which leave out login and logout; every checksum must
#                   equal the reference: the data read is checked)
#       iscsi-perf: iscsi-perf -m QD -b BLOCK/LUN_BLOCK -t IPERF_SECONDS URL
#                   (libiscsi 1.19's sequential READ(16) loop; see "iscsi-perf"
#                   below for how its output is parsed)
#     case copy (LUN 1 -> a loop device over a fresh sparse file in BENCH_DIR,
#     `losetup --direct-io=on`, new for every run):
#       volback:    volback copy [VOLBACK_COPY_ARGS] --progress json URL /dev/loopN
#       qemu-img:   qemu-img convert -n -f raw -O raw -t none -m 16 -W URL /dev/loopN
#       every destination is compared with lun1.img (cmp, after flushing and
#       dropping caches);
#     case write (local file -> LUN 2; the source, BENCH_DIR/src-write.bin, is
#     other random data than LUN 1's, read from disk by both tools: caches
#     dropped, not warmed):
#       volback:    volback copy [VOLBACK_COPY_ARGS] --progress json FILE iscsi://.../2
#       qemu-img:   qemu-img convert -n -f raw -O raw -t none -m 16 -W FILE iscsi://.../2
#       both end with SYNCHRONIZE CACHE (tgtd fdatasyncs lun2.img); after every
#       run caches are dropped and lun2.img is compared with the source (cmp);
#   * CPU: every tool runs under `/usr/bin/time -f '%U %S %e'`; CPU s/GiB =
#     (user + sys) / GiB moved by the tool (volback read: its bytes_read;
#     iscsi-perf: its reported throughput x IPERF_SECONDS, as it reports no
#     byte count; copy/write: SIZE). The process's whole life counts (start,
#     login, logout; for iscsi-perf also the requests still in flight when its
#     time is up, about QD x BLOCK more than the bytes credited to it).
#     tgtd's CPU is not in those numbers (it serves both the same way); it is
#     sampled from /proc/TGTD_PID/stat (utime+stime, all threads) before and
#     after every run and reported per GiB tgtd moved during the run
#     (min of the rchar and wchar deltas of /proc/TGTD_PID/io: file reads + socket
#     reads and socket writes + file writes, i.e. the data plus a few headers);
#   * prints a results table of medians: case, tool, median s, MB/s, CPU s/GiB,
#     tgtd CPU s/GiB, ratio vs the peer, target, PASS/MISS:
#       read:  volback MB/s >= 1.0x iscsi-perf's (1 MiB requests, QD 16 by default),
#              volback CPU s/GiB <= 1.5x iscsi-perf's;
#       copy, write: ratio only (peer s / volback s; > 1: volback is faster);
#     and the command that reproduces the run.
#
# iscsi-perf (libiscsi-bin 1.19): options -m max requests in flight, -b blocks
# per request (LUN blocks, 512 bytes on tgt), -t run time in seconds (without
# it, it runs until interrupted), -i initiator name, -r random, -n ignore errors.
# It reads the LUN sequentially and wraps round to LBA 0 at the end, so it reads
# a 1 GiB LUN several times in IPERF_SECONDS; it prints a progress line per
# second (separated by \r) and, when the time is up, `iops average N (M MB/s)`
# then `finished.`. The script takes the last `iops average N` and computes
# bytes/s = N x bytes per request (M is the same in MiB/s, truncated); the
# table's "median s" for iscsi-perf is SIZE / that throughput (an equivalent
# time for one pass, not a measured one). Its -t end is checked at its 1 s
# progress prints against whole elapsed seconds, so a stall of over a second
# could make it run on: it is stopped with SIGINT (its own way to stop) after
# IPERF_SECONDS + 30 s and that run counts as failed. Every read run also
# prints a warning when the bytes credited to the tool differ by over 10% from
# what tgtd moved during the run.
#
# Environment:
#   SIZE=1G          LUN size (numfmt IEC; multiple of 1 MiB and of BLOCK)
#   RUNS=3           rounds (medians reported)
#   CASES="read copy write"  which cases to run
#   BLOCK=1M         case read: bytes per request (volback --block-size, iscsi-perf -b)
#   QD=16            case read: requests in flight (volback --queue-depth, iscsi-perf -m)
#   IPERF_SECONDS=5  case read: iscsi-perf's run time (-t)
#   WARM=1           read lun1.img into the page cache after dropping caches
#                    (cases read and copy); 0: leave it cold
#   READ_PASSES=10   case read: volback passes over the LUN per run, so that
#                    both tools' rates average over a few seconds: one pass
#                    of a 1 GiB LUN takes half a second, and a single pass
#                    landed in one of two states of this host (tgtd at about
#                    0.48 or 0.65 s of CPU per GiB, the same LUN read at
#                    about 2,500 or 1,800 MB/s) where iscsi-perf's 5 s
#                    averaged over both. Each pass pays volback's start
#                    (pipeline fill) again; iscsi-perf's start counts once.
#   READ_SEGMENT_REF=262144  case read: also time volback with
#                    `?max_recv_data_segment_length=N` on its URL, a reference
#                    row (same passes, rotated with the others). volback
#                    declares 1 MiB by default and libiscsi 256 KiB, so tgtd
#                    sends volback one Data-In PDU per 1 MiB read and
#                    iscsi-perf four; the reference row shows volback with
#                    libiscsi's segments. 0: no reference row
#   READ_CHECKSUM=0  case read: 0 (default): timed volback reads are pure reads
#                    (`--no-checksum`, like iscsi-perf; the data is checked by
#                    the warm-up read's checksum); 1: every timed read hashes
#                    the data and must return the backing file's checksum
#   TGT_PARAMS="MaxRecvDataSegmentLength=262144 MaxXmitDataSegmentLength=262144
#               MaxBurstLength=1048576 FirstBurstLength=262144"
#                    target parameters (tgtd's defaults: 8192, 8192, 262144,
#                    65536); "" keeps tgtd's defaults
#   VOLBACK_COPY_ARGS=".."  extra flags for `volback copy` (word-split; cases
#                    copy, write), e.g. "--block-size 1M --queue-depth 16";
#                    default: none (volback's defaults, 4M and 32)
#   VOLBACK=path     volback binary; if unset the script runs
#                    `cargo build --release -p volback-engine` and uses
#                    ${CARGO_TARGET_DIR:-target}/release/volback
#   BENCH_DIR=/var/tmp/volback-bench-iscsi  scratch dir (a disk, not tmpfs: the
#                    LUN backing files and the loop device's file live there)
#   KEEP=1           keep the random files (reused by the next run) and tgtd's
#                    log (BENCH_DIR/tgtd/log); tgtd and the loop devices go anyway
#   TGT_PORT=n       tgtd's portal port (default: tgt.sh picks a free one)
#   TGTD_ENV="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456"
#                    environment for tgtd (word-split; "" for none). tgtd
#                    allocates a buffer per command; with glibc's default,
#                    self-adjusting thresholds it either reuses heap memory
#                    or maps and faults in every page of every buffer
#                    (263,000 faults per GiB read), depending on its history,
#                    so its rate moved 2x between runs and even within one
#                    tgtd's life. Fixed thresholds keep it in the first state
#                    for every run. Both tools face the same tgtd.
#   VOLBACK_LOG=warn volback's log filter (its stderr is shown on failures)
#
# Exit status: non-zero only on a correctness failure: a command failed or its
# output could not be parsed, a checksum or a destination differed from its
# source (FAIL). Performance targets are informational (PASS/MISS). Cleanup (an
# EXIT trap, also on Ctrl-C) deletes the target, stops tgtd with
# `fixtures/tgt.sh stop`, detaches the loop devices, removes BENCH_DIR's files and
# checks that none of its tgtd or loop devices are left.

set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- settings ---

SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
CASES=${CASES:-read copy write}
BLOCK=${BLOCK:-1M}
QD=${QD:-16}
IPERF_SECONDS=${IPERF_SECONDS:-5}
WARM=${WARM:-1}
READ_CHECKSUM=${READ_CHECKSUM:-0}
READ_PASSES=${READ_PASSES:-10}
READ_SEGMENT_REF=${READ_SEGMENT_REF:-262144}
TGT_PARAMS=${TGT_PARAMS-MaxRecvDataSegmentLength=262144 MaxXmitDataSegmentLength=262144 MaxBurstLength=1048576 FirstBurstLength=262144}
BENCH_DIR=${BENCH_DIR:-/var/tmp/volback-bench-iscsi}
KEEP=${KEEP:-0}
TGT_PORT=${TGT_PORT:-}
TGTD_ENV=${TGTD_ENV-MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456}
read -ra VOLBACK_COPY_EXTRA <<<"${VOLBACK_COPY_ARGS:-}"
export VOLBACK_LOG=${VOLBACK_LOG:-warn}

IQN=iqn.2024-01.org.volback:bench-iscsi
QEMU_ARGS=(-n -f raw -O raw -t none -m 16 -W)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TGT_SH=$REPO_ROOT/fixtures/tgt.sh
ORIG_CMD="$(printf '%q ' "$0" "$@")"

[[ $EUID -eq 0 ]] || die "must run as root (losetup, drop_caches, tgtd)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
[[ $QD =~ ^[1-9][0-9]*$ ]] || die "QD must be a positive integer"
[[ $IPERF_SECONDS =~ ^[1-9][0-9]*$ ]] || die "IPERF_SECONDS must be a positive integer"
[[ $READ_PASSES =~ ^[1-9][0-9]*$ ]] || die "READ_PASSES must be a positive integer"
[[ $READ_SEGMENT_REF =~ ^[0-9]+$ ]] && (( READ_SEGMENT_REF == 0 ||
    (READ_SEGMENT_REF >= 512 && READ_SEGMENT_REF < 16777216) )) ||
    die "READ_SEGMENT_REF must be 0 or a segment length from 512 to 16777215 bytes"
[[ $WARM == 0 || $WARM == 1 ]] || die "WARM must be 0 or 1"
DO_READ=0 DO_COPY=0 DO_WRITE=0
for c in $CASES; do
    case $c in
    read) DO_READ=1 ;;
    copy) DO_COPY=1 ;;
    write) DO_WRITE=1 ;;
    *) die "unknown case '$c' (read, copy, write)" ;;
    esac
done
(( DO_READ + DO_COPY + DO_WRITE )) || die "CASES names no case"

SIZE_BYTES=$(bytes SIZE "$SIZE")
BLOCK_BYTES=$(bytes BLOCK "$BLOCK")
MiB=$((1024 * 1024))
(( BLOCK_BYTES > 0 && BLOCK_BYTES % 4096 == 0 )) ||
    die "BLOCK must be a positive multiple of 4 KiB (got $BLOCK_BYTES bytes)"
(( SIZE_BYTES > 0 && SIZE_BYTES % MiB == 0 && SIZE_BYTES % BLOCK_BYTES == 0 )) ||
    die "SIZE must be a positive multiple of 1 MiB and of BLOCK (got $SIZE_BYTES bytes)"
declare -a TGT_KV=()
for kv in $TGT_PARAMS; do
    [[ $kv =~ ^[A-Za-z0-9_]+=[^=]+$ ]] || die "TGT_PARAMS: '$kv' is not NAME=VALUE"
    TGT_KV+=("$kv")
done

# --------------------------------------------------------------- tools -------

APT_UPDATED=0
bash "$TGT_SH" install
need_pkg util-linux mount diffutils coreutils python3 time qemu-utils qemu-block-extra
for c in tgtd tgtadm iscsi-perf iscsi-readcapacity16 qemu-img losetup cmp python3; do
    command -v "$c" >/dev/null || die "$c not found after installing its package"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time (package time) not found"
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------- scratch + cleanup ---

[[ $BENCH_DIR != *[[:space:]]* ]] || die "BENCH_DIR must not contain white space"
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
[[ $BENCH_DIR != / ]] || die "BENCH_DIR must not be /"
FSTYPE=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
[[ $FSTYPE != tmpfs && $FSTYPE != ramfs ]] ||
    die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; pick a directory on a disk"

TGT_DIR=$BENCH_DIR/tgtd
LUN_FILE=$BENCH_DIR/lun1.img         # LUN 1: random; read and copy source
SRC_FILE=$BENCH_DIR/src-write.bin    # case write: the source (other random data)
LUN2_FILE=$BENCH_DIR/lun2.img        # LUN 2: case write's destination
DST_FILE=$BENCH_DIR/dst.img          # case copy: the loop device's file
RESULTS=$BENCH_DIR/results.tsv
TOOL_LOG=$BENCH_DIR/tool.log
OUT=$BENCH_DIR/out.txt
TIME_FILE=$BENCH_DIR/time.txt
TGT_STARTED=0
TGT_PID= TGT_CTL= TGT_PORTAL=
LOOPS=()

exec 3>&1 4>&2   # cleanup's messages must not vanish into a tool's log

# Whether TGT_PID is alive and still our tgtd.
tgtd_alive() {
    [[ -n $TGT_PID && -n $TGT_CTL ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$TGT_PID/cmdline" |
        grep -qF -- "tgtd -f --iscsi portal=$TGT_PORTAL -C $TGT_CTL "
}

cleanup() {
    local rc=$? dev left
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    for dev in "${LOOPS[@]}"; do detach_retry "$dev"; done
    for dev in $(our_loops); do detach_retry "$dev"; done
    if (( TGT_STARTED )) || [[ -e $TGT_DIR ]]; then
        # Without targets tgtd exits on `tgtadm --mode sys --op delete` (tgt.sh
        # stop asks that first); with them it takes tgt.sh's SIGKILL.
        if tgtd_alive; then
            timeout 10 tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 \
                >/dev/null 2>&1
        fi
        KEEP=$KEEP bash "$TGT_SH" stop "$TGT_DIR" 2>&1 | sed 's/^/   | /'
    fi
    rm -f -- "$DST_FILE" "$LUN2_FILE" "$RESULTS" "$TOOL_LOG" "$OUT" "$TIME_FILE"
    if [[ $KEEP != 1 ]]; then
        rm -f -- "$LUN_FILE" "$LUN_FILE.ok" "$SRC_FILE" "$SRC_FILE.ok"
        rmdir -- "$BENCH_DIR" 2>/dev/null || true
    else
        echo "KEEP=1: random files kept in $BENCH_DIR (tgtd's log in $TGT_DIR/log)"
    fi
    left=$(losetup -a | grep -F "$BENCH_DIR/" || true)
    if tgtd_alive; then left+=$'\n'"tgtd pid $TGT_PID still running"; fi
    if [[ -n $TGT_PORTAL ]]; then
        left+=$(pgrep -a tgtd | grep -F "portal=$TGT_PORTAL -C $TGT_CTL" | sed 's/^/\n/' || true)
    fi
    if [[ -n ${left//$'\n'/} ]]; then
        echo "iscsi.sh: WARNING: left behind:" >&2
        echo "$left" >&2
        (( rc )) || rc=3
    else
        echo "cleanup: no bench loop devices or tgtd left (losetup -a, pgrep -a tgtd checked)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT    # `exit` runs the EXIT trap, i.e. cleanup
trap 'exit 143' TERM

# Room: two LUN files, the write source, the loop destination, slack.
need_room $(( SIZE_BYTES * 4 + 1024 * MiB ))

ensure_volback

warm_lun() { # the LUN's backing file into the page cache (WARM=1)
    (( WARM )) || return 0
    cat "$LUN_FILE" >/dev/null
}

# ----------------------------------------------------------- random files ----

random_file() { # random_file PATH
    local want="size=$SIZE_BYTES v=1"
    if [[ -f $1 && -f $1.ok && $(stat -c %s "$1") == "$SIZE_BYTES" && $(cat "$1.ok") == "$want" ]]; then
        log "reusing random data $1"
        return 0
    fi
    rm -f -- "$1" "$1.ok"
    log "generating $SIZE_BYTES bytes of random data ($1)"
    head -c "$SIZE_BYTES" /dev/urandom >"$1"
    echo "$want" >"$1.ok"
}
random_file "$LUN_FILE"
(( DO_WRITE )) && random_file "$SRC_FILE"

# ------------------------------------------------------------------- tgtd ----

# A tgtd left by an earlier, killed run: stop it (tgt.sh only touches a
# directory it made, and only the PID it recorded there).
if [[ -e $TGT_DIR ]]; then
    log "stopping a tgtd left in $TGT_DIR by an earlier run"
    KEEP=0 bash "$TGT_SH" stop "$TGT_DIR" 2>&1 | sed 's/^/   | /'
fi
log "starting tgtd in $TGT_DIR"
TGT_STARTED=1
# In a session of its own: a Ctrl-C to the script's process group must not
# stop tgt.sh between launching tgtd and recording its PID (the script waits
# for the start to finish, then its EXIT trap stops tgtd).
read -ra tgtd_env <<<"$TGTD_ENV"
log "tgtd's environment: ${TGTD_ENV:-(as inherited)}"
out=$(env "${tgtd_env[@]}" setsid --wait bash "$TGT_SH" start "$TGT_DIR" $TGT_PORT </dev/null 2>"$TOOL_LOG") ||
    die_log "could not start tgtd"
[[ $out =~ ^TGT_PORTAL=([^[:space:]]+)\ TGT_CONTROL=([0-9]+)$ ]] ||
    die "tgt.sh start printed '$out', not TGT_PORTAL=.. TGT_CONTROL=.."
TGT_PORTAL=${BASH_REMATCH[1]} TGT_CTL=${BASH_REMATCH[2]}
TGT_PID=$(sed -n 's/^TGT_PID=//p' "$TGT_DIR/env")
tgtd_alive || die "tgtd (pid '$TGT_PID') is not running after tgt.sh start"
log "tgtd up: pid $TGT_PID, portal $TGT_PORTAL, control port $TGT_CTL"

tgtadm_() { timeout 10 tgtadm -C "$TGT_CTL" --lld iscsi "$@"; }
tgtadm_ok() { tgtadm_ "$@" >"$TOOL_LOG" 2>&1 || die_log "tgtadm $* failed"; }

URL1=iscsi://$TGT_PORTAL/$IQN/1
URL2=iscsi://$TGT_PORTAL/$IQN/2
tgtadm_ok --mode target --op new --tid 1 --targetname "$IQN"
tgtadm_ok --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$LUN_FILE"
if (( DO_WRITE )); then
    rm -f -- "$LUN2_FILE"
    truncate -s "$SIZE_BYTES" "$LUN2_FILE"
    tgtadm_ok --mode logicalunit --op new --tid 1 --lun 2 --backing-store "$LUN2_FILE"
fi
tgtadm_ok --mode target --op bind --tid 1 --initiator-address ALL
for kv in "${TGT_KV[@]}"; do
    tgtadm_ok --mode target --op update --tid 1 --name "${kv%%=*}" --value "${kv#*=}"
done
SHOWN_KEYS='MaxRecvDataSegmentLength|MaxXmitDataSegmentLength|MaxBurstLength|FirstBurstLength|HeaderDigest|DataDigest|InitialR2T|ImmediateData|MaxOutstandingR2T|MaxQueueCmd'
TARGET_SETTINGS=$(tgtadm_ --mode target --op show --tid 1 | grep -E "^($SHOWN_KEYS)=" | tr '\n' ' ')
SHOW_ALL=$(tgtadm_ --mode target --op show --tid 1)
for kv in "${TGT_KV[@]}"; do
    grep -qxF "$kv" <<<"$SHOW_ALL" || die "tgtd did not take $kv (target shows: $TARGET_SETTINGS)"
done
log "target $IQN: LUN 1 = $LUN_FILE$( (( DO_WRITE )) && echo ", LUN 2 = $LUN2_FILE")"
log "target settings (the same for every tool): $TARGET_SETTINGS"

# ------------------------------------------------------------- preflight -----

LUN_BS=$(iscsi-readcapacity16 "$URL1" 2>"$TOOL_LOG" | sed -n 's/^LOGICAL BLOCK LENGTH IN BYTES://p') ||
    true
LUN_SIZE=$(iscsi-readcapacity16 -s "$URL1" 2>>"$TOOL_LOG") || true
[[ $LUN_BS =~ ^[0-9]+$ && $LUN_SIZE == "$SIZE_BYTES" ]] ||
    die_log "iscsi-readcapacity16 $URL1: block size '$LUN_BS', size '$LUN_SIZE' (want $SIZE_BYTES)"
(( BLOCK_BYTES % LUN_BS == 0 )) || die "BLOCK ($BLOCK_BYTES) is not a multiple of the LUN's block size $LUN_BS"
IPERF_BLOCKS=$(( BLOCK_BYTES / LUN_BS ))
qemu-img info "$URL1" >"$TOOL_LOG" 2>&1 ||
    die_log "qemu-img cannot open $URL1 (qemu-block-extra's iscsi driver?)"

# Fields of volback's last summary line in $OUT:
# bytes_read elapsed_s checksum(or -)
summary_fields() {
    python3 - "$OUT" <<'EOF'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
d = [e for e in s if e.get("event") == "summary"][-1]
print(d["bytes_read"], d["elapsed_s"], d.get("checksum") or "-")
EOF
}

log "reference checksum of $LUN_FILE (volback read, local file)"
"$VOLBACK" read "$LUN_FILE" --sparse never --progress json >"$OUT" 2>"$TOOL_LOG" ||
    die_log "volback read $LUN_FILE failed"
read -r _ _ REF_SUM < <(summary_fields) || die "cannot parse volback read's summary"
[[ $REF_SUM != - ]] || die "volback read printed no checksum"
log "  $REF_SUM"

log "warm-up: volback read $URL1 (must return the same checksum)"
VOLBACK_LOG=info "$VOLBACK" read "$URL1" --block-size "$BLOCK_BYTES" --queue-depth "$QD" \
    --sparse never --progress json >"$OUT" 2>"$TOOL_LOG" ||
    die_log "volback read $URL1 failed"
read -r _ _ sum < <(summary_fields) || die "cannot parse volback read's summary"
[[ $sum == "$REF_SUM" ]] || die "volback read $URL1 returned checksum $sum, the backing file has $REF_SUM"
NEG=$(sed 's/\x1b\[[0-9;]*m//g' "$TOOL_LOG" | grep -o 'negotiated=Negotiated {[^}]*}' | tail -1 || true)
log "  checksum OK; volback ${NEG:-negotiated=? (not in its log)}"

# ----------------------------------------------------------------- runs ------

: >"$RESULTS"
FAILED=0

# Fields of result: CASE TOOL RUN SECS RATE_BPS CPU_S GIB TGT_CPU_S TGT_BYTES STATUS

# tgtd's CPU ticks (utime+stime, all threads) and I/O byte counters.
tgt_sample() {
    local ticks rchar wchar
    ticks=$(awk '{ print $14 + $15 }' "/proc/$TGT_PID/stat")
    rchar=$(awk '$1 == "rchar:" { print $2 }' "/proc/$TGT_PID/io")
    wchar=$(awk '$1 == "wchar:" { print $2 }' "/proc/$TGT_PID/io")
    echo "$ticks $rchar $wchar"
}

# timeout(1) arguments of the next measure: signal and limit.
LIMIT_ARGS=(-s TERM 900)

# measure CMD...: runs CMD (stdout to $OUT, stderr to $TOOL_LOG) under
# /usr/bin/time; sets RC, WALL (s, EPOCHREALTIME), CPU (user+sys s),
# TGT_CPU (s) and TGT_BYTES (min of tgtd's rchar and wchar deltas).
measure() {
    local c0 r0 w0 c1 r1 w1 t0 t1 u s
    tgtd_alive || die "tgtd (pid $TGT_PID) is gone (its log: $TGT_DIR/log)"
    read -r c0 r0 w0 < <(tgt_sample)
    RC=0
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S %e' -o "$TIME_FILE" timeout --foreground "${LIMIT_ARGS[@]}" "$@" \
        >"$OUT" 2>"$TOOL_LOG" || RC=$?
    t1=$EPOCHREALTIME
    tgtd_alive || die "tgtd (pid $TGT_PID) died while running $1 (its log: $TGT_DIR/log)"
    read -r c1 r1 w1 < <(tgt_sample)
    read -r u s _ < <(tail -1 "$TIME_FILE" 2>/dev/null) || true
    [[ $u =~ ^[0-9.]+$ && $s =~ ^[0-9.]+$ ]] || { u=0 s=0; (( RC )) || RC=125; }
    WALL=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
    CPU=$(python3 -c "print(f'{$u + $s:.2f}')")
    TGT_CPU=$(python3 -c "print(f'{($c1 - $c0) / $CLK_TCK:.2f}')")
    TGT_BYTES=$(( r1 - r0 < w1 - w0 ? r1 - r0 : w1 - w0 ))
}

show_log() { show_tool_log; [[ ! -s $OUT ]] || tail -5 "$OUT" | tr '\r' '\n' | tail -5 | sed 's/^/   | /' >&2; }

# run_line CASE RUN TOOL SECS RATE CPU GIB STATUS
run_line() {
    printf '   %-5s run %d/%d  %-10s %8.3f s %8.1f MB/s  CPU %5.2f s = %5.3f s/GiB  tgtd %5.2f s / %5.2f GiB  %s\n' \
        "$1" "$2" "$RUNS" "$3" "$4" "$(python3 -c "print($5 / 1e6)")" "$6" \
        "$(python3 -c "print($6 / $7 if $7 else 0)")" "$TGT_CPU" \
        "$(python3 -c "print($TGT_BYTES / 2**30)")" "$8"
}

# ------------------------------------------------------------- case read -----

read_run() { # read_run RUN TOOL
    local run=$1 tool=$2 status=OK secs=0 rate=0 gib=0 rd el sum avg
    drop_caches
    warm_lun
    if [[ $tool == volback* ]]; then
        local url=$URL1
        [[ $tool == volback-ref ]] && url="$URL1?max_recv_data_segment_length=$READ_SEGMENT_REF"
        local sum_args=(--no-checksum) want_sum=-
        if (( READ_CHECKSUM )); then sum_args=(); want_sum=$REF_SUM; fi
        # READ_PASSES passes, one process each; the rate is all bytes over
        # all elapsed_s, CPU and tgtd's figures the sums (see READ_PASSES).
        local pass bytes=0 elapsed=0 cpu=0 tcpu=0 tbytes=0
        for (( pass = 1; pass <= READ_PASSES; pass++ )); do
            measure "$VOLBACK" read "$url" --block-size "$BLOCK_BYTES" --queue-depth "$QD" \
                --sparse never --progress json "${sum_args[@]}"
            if (( RC )); then
                status=FAIL; fail "read run $run pass $pass: volback read exited with status $RC:"; show_log
            elif ! read -r rd el sum < <(summary_fields); then
                status=FAIL; fail "read run $run pass $pass: cannot parse volback read's summary:"; show_log
            elif [[ $rd != "$SIZE_BYTES" || $sum != "$want_sum" ]]; then
                status=FAIL; fail "read run $run pass $pass: volback read $rd bytes with checksum $sum (want $SIZE_BYTES, $want_sum)"
            fi
            [[ $status == OK ]] || break
            bytes=$(( bytes + rd ))
            read -r elapsed cpu tcpu < <(python3 -c "print($elapsed + $el, $cpu + $CPU, $tcpu + $TGT_CPU)")
            tbytes=$(( tbytes + TGT_BYTES ))
        done
        CPU=$cpu TGT_CPU=$tcpu TGT_BYTES=$tbytes
        if [[ $status == OK ]]; then
            rate=$(python3 -c "print($bytes / $elapsed)")
            secs=$(python3 -c "print($SIZE_BYTES / $rate)")
            gib=$(python3 -c "print($bytes / 2**30)")
        fi
    else
        # SIGINT is iscsi-perf's own way to stop (it drains, prints, logs
        # out). Its -t counter compares whole elapsed seconds at its 1 s
        # progress prints, so a stall of over a second can skip the end: the
        # limit stops it then, and the run counts as failed.
        LIMIT_ARGS=(-s INT -k 10 $(( IPERF_SECONDS + 30 )))
        measure iscsi-perf -m "$QD" -b "$IPERF_BLOCKS" -t "$IPERF_SECONDS" "$URL1"
        LIMIT_ARGS=(-s TERM 900)
        # The final report is the "iops average N (M MB/s)" line with no
        # "in_flight" after it (the per-second lines have one).
        avg=$(tr '\r' '\n' <"$OUT" | sed -n 's/^iops average \([0-9][0-9]*\) ([0-9]* MB\/s) *$/\1/p' | tail -1)
        if (( RC == 124 )); then
            status=FAIL; fail "read run $run: iscsi-perf did not stop after -t $IPERF_SECONDS (stopped with SIGINT):"; show_log
        elif (( RC )); then
            status=FAIL; fail "read run $run: iscsi-perf exited with status $RC:"; show_log
        elif [[ -z $avg ]] || ! grep -q '^finished\.' <(tr '\r' '\n' <"$OUT") || (( avg == 0 )); then
            status=FAIL; fail "read run $run: no final 'iops average N (M MB/s)' + 'finished.' in iscsi-perf's output:"; show_log
        else
            rate=$(( avg * BLOCK_BYTES ))
            secs=$(python3 -c "print($SIZE_BYTES / $rate)")
            gib=$(python3 -c "print($rate * $IPERF_SECONDS / 2**30)")
        fi
    fi
    # Cross-check: what tgtd moved during the run vs the bytes credited.
    if [[ $status == OK ]]; then
        python3 -c "import sys; g, t = $gib, $TGT_BYTES / 2**30; sys.exit(abs(t - g) > 0.1 * g)" ||
            echo "   !! read run $run: $tool is credited $(printf %.2f "$gib") GiB but tgtd moved" \
                "$(python3 -c "print(f'{$TGT_BYTES / 2**30:.2f}')") GiB during the run (CPU/GiB may be off)"
    fi
    run_line read "$run" "$tool" "$secs" "$rate" "$CPU" "$gib" "$status"
    result read "$tool" "$run" "$secs" "$rate" "$CPU" "$gib" "$TGT_CPU" "$TGT_BYTES" "$status"
}

# ------------------------------------------------------------- case copy -----

DST_LOOP=
# transfer_run CASE RUN TOOL FROM TO EXPECTED ACTUAL: volback copy or qemu-img
# convert FROM -> TO, then ACTUAL compared with EXPECTED (a block device after
# flushing it, over SIZE bytes; a file whole).
transfer_run() {
    local case=$1 run=$2 tool=$3 from=$4 to=$5 expected=$6 actual=$7 status=OK rate=0 gib n=()
    if [[ $tool == volback ]]; then
        measure "$VOLBACK" copy "${VOLBACK_COPY_EXTRA[@]}" --progress json "$from" "$to"
    else
        measure qemu-img convert "${QEMU_ARGS[@]}" "$from" "$to"
    fi
    if (( RC )); then
        status=FAIL; fail "$case run $run: $tool exited with status $RC:"; show_log
    else
        if [[ -b $actual ]]; then
            blockdev --flushbufs "$actual"
            n=(-n "$SIZE_BYTES")
        fi
        drop_caches
        if ! cmp "${n[@]}" "$expected" "$actual" >"$TOOL_LOG" 2>&1; then
            status=FAIL; fail "$case run $run: $actual differs from $expected after $tool:"; show_log
        fi
    fi
    [[ $status == OK ]] && rate=$(python3 -c "print($SIZE_BYTES / $WALL)")
    gib=$(python3 -c "print($SIZE_BYTES / 2**30)")
    run_line "$case" "$run" "$tool" "$WALL" "$rate" "$CPU" "$gib" "$status"
    result "$case" "$tool" "$run" "$WALL" "$rate" "$CPU" "$gib" "$TGT_CPU" "$TGT_BYTES" "$status"
}

copy_run() { # copy_run RUN TOOL
    reset_dst
    drop_caches
    warm_lun
    transfer_run copy "$1" "$2" "$URL1" "$DST_LOOP" "$LUN_FILE" "$DST_LOOP"
}

# ------------------------------------------------------------ case write -----

write_run() { # write_run RUN TOOL
    # Empty LUN 2 (same inode, tgtd keeps its descriptor): no session is open.
    truncate -s 0 "$LUN2_FILE"
    truncate -s "$SIZE_BYTES" "$LUN2_FILE"
    drop_caches
    transfer_run write "$1" "$2" "$SRC_FILE" "$URL2" "$SRC_FILE" "$LUN2_FILE"
}

# ---------------------------------------------------------------- rounds -----

echo
log "SIZE=$SIZE ($SIZE_BYTES bytes) RUNS=$RUNS CASES='$CASES' BLOCK=$BLOCK QD=$QD" \
    "IPERF_SECONDS=$IPERF_SECONDS WARM=$WARM VOLBACK_COPY_ARGS='${VOLBACK_COPY_ARGS:-}'"
log "volback: $VOLBACK ($("$VOLBACK" --version))"
log "tgt $(dpkg-query -W -f '${Version}' tgt), libiscsi $(dpkg-query -W -f '${Version}' libiscsi7 2>/dev/null || echo '?')," \
    "qemu-img $(qemu-img --version | head -1 | awk '{print $3}'); $(nproc) CPUs"
log "LUN block size $LUN_BS bytes: iscsi-perf -b $IPERF_BLOCKS = $BLOCK_BYTES bytes per request"
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (others' work skews the times)"
for (( run = 1; run <= RUNS; run++ )); do
    ROT=$(( run - 1 ))
    if (( DO_READ )); then
        READ_TOOLS=(volback iscsi-perf)
        (( READ_SEGMENT_REF )) && READ_TOOLS+=(volback-ref)
        rotate "${READ_TOOLS[@]}"
        for tool in "${ORDER[@]}"; do read_run "$run" "$tool"; done
    fi
    if (( DO_COPY )); then
        rotate volback qemu-img
        for tool in "${ORDER[@]}"; do copy_run "$run" "$tool"; done
    fi
    if (( DO_WRITE )); then
        rotate volback qemu-img
        for tool in "${ORDER[@]}"; do write_run "$run" "$tool"; done
    fi
done
drop_dst
rm -f -- "$DST_FILE"

# ------------------------------------------------------------------ table ----

echo
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RESULTS" "$SIZE_BYTES" "$BLOCK_BYTES" "$QD" "$IPERF_SECONDS" "$WARM" "$TARGET_SETTINGS" "$READ_CHECKSUM" "$READ_PASSES" "$READ_SEGMENT_REF" <<'EOF'
import statistics, sys
from collections import defaultdict

path, size, block, qd, secs_iperf, warm, settings, read_checksum, passes, seg_ref = sys.argv[1:]
size, block = int(size), int(block)
rows, order = defaultdict(list), []
for line in open(path):
    case, tool, run, secs, rate, cpu, gib, tcpu, tbytes, status = line.rstrip("\n").split("\t")
    key = (case, tool)
    if key not in rows:
        order.append(key)
    rows[key].append(dict(secs=float(secs), rate=float(rate), cpu=float(cpu), gib=float(gib),
                          tcpu=float(tcpu), tbytes=int(tbytes), ok=status == "OK"))

def med(key, f):
    vals = [f(r) for r in rows.get(key, []) if r["ok"]]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fails(key):
    return sum(not r["ok"] for r in rows.get(key, []))

def fmt(x, spec):
    return "-" if x is None else format(x, spec)

PEER = {"read": "iscsi-perf", "copy": "qemu-img", "write": "qemu-img"}
NAME = {("read", "volback"): "volback read", ("read", "iscsi-perf"): "iscsi-perf",
        ("read", "volback-ref"): f"volback {int(seg_ref) // 1024}K seg",
        ("copy", "volback"): "volback copy", ("copy", "qemu-img"): "qemu-img convert",
        ("write", "volback"): "volback copy", ("write", "qemu-img"): "qemu-img convert"}
nruns = max((len(v) for v in rows.values()), default=0)
print(f"Results: {size} bytes ({size / 2**30:g} GiB) LUN of random data on a throwaway tgtd (127.0.0.1), "
      f"median of {nruns} run(s); MB = 10^6 bytes")
print(f"  target settings (all tools): {settings.strip()}")
print(f"  read:  LUN 1, {block // 1024} KiB requests, {qd} in flight; volback: bytes_read / elapsed_s over {passes} pass(es)"
      f" (median s* = SIZE / that rate; {'checksum checked' if read_checksum == '1' else 'pure read, --no-checksum'});")
print(f"         iscsi-perf: its average over {secs_iperf} s (median s* = SIZE / that rate);"
      f" LUN file {'warm in' if warm == '1' else 'cold, dropped from'} the page cache")
print("  copy:  LUN 1 -> loop device (direct I/O) over a fresh sparse file; write: local file -> LUN 2;"
      " s = wall time incl. login")
print("  CPU s/GiB: tool's user+sys / GiB it moved; tgtd: the target's CPU / GiB it moved in the same run")
print("  vs peer: volback's MB/s / peer's MB/s (>1: volback faster); CPU vs peer: volback's CPU s/GiB / peer's")
print()
hdr = (f"{'case':<6}{'tool':<18}{'median s':>9} {'MB/s':>8} {'CPU s/GiB':>10} {'tgtd s/GiB':>11} "
       f"{'vs peer':>8} {'CPU vs':>7}  {'target':<30} {'result':<6}")
print(hdr)
print("-" * len(hdr))
for key in order:
    case, tool = key
    name = NAME.get(key, tool)
    nf = fails(key)
    status = f"FAIL({nf})" if nf else ""
    s = med(key, lambda r: r["secs"])
    if s is None:
        print(f"{case:<6}{name:<18}{'-':>9} {'-':>8} {'-':>10} {'-':>11} {'-':>8} {'-':>7}  {'':<30} {status}")
        continue
    rate = med(key, lambda r: r["rate"])
    cpu = med(key, lambda r: r["cpu"] / r["gib"] if r["gib"] else None)
    tcpu = med(key, lambda r: r["tcpu"] / (r["tbytes"] / 2**30) if r["tbytes"] else None)
    peer = (case, PEER[case])
    lines = []
    vs = cvs = "-"
    if tool.startswith("volback"):
        prate = med(peer, lambda r: r["rate"])
        pcpu = med(peer, lambda r: r["cpu"] / r["gib"] if r["gib"] else None)
        rr = rate / prate if prate else None
        cr = cpu / pcpu if (pcpu and cpu is not None) else None
        vs, cvs = fmt(rr, ".2f") + ("x" if rr else ""), fmt(cr, ".2f") + ("x" if cr else "")
        if tool == "volback-ref":
            lines.append((f"reference: {int(seg_ref) // 1024} KiB Data-In", ""))
        elif case == "read":
            lines.append((f"MB/s >= 1.0x iscsi-perf", "-" if rr is None else ("PASS" if rr >= 1.0 else "MISS")))
            lines.append((f"CPU/GiB <= 1.5x iscsi-perf", "-" if cr is None else ("PASS" if cr <= 1.5 else "MISS")))
        else:
            lines.append((f"ratio only (vs {PEER[case]})", ""))
    else:
        lines.append(("(peer)", ""))
    star = "*" if case == "read" else " "
    first = True
    for tgt, res in lines:
        res = " ".join(x for x in (res, status) if x)
        if first:
            print(f"{case:<6}{name:<18}{s:>8.3f}{star} {rate / 1e6:>8.1f} {fmt(cpu, '.3f'):>10} {fmt(tcpu, '.3f'):>11} "
                  f"{vs:>8} {cvs:>7}  {tgt:<30} {res}")
            first = False
        else:
            print(f"{'':<6}{'':<18}{'':>9} {'':>8} {'':>10} {'':>11} {'':>8} {'':>7}  {tgt:<30} {res}")
print()
bad = [k for k in order if fails(k)]
if bad:
    print("CORRECTNESS: FAIL (" + ", ".join(f"{c} {t}" for c, t in bad) + "; see the FAIL messages above)")
else:
    done = []
    if any(c == "read" for c, _ in order):
        done.append("every volback read returned the backing file's checksum; every iscsi-perf run finished")
    if any(c == "copy" for c, _ in order):
        done.append("every loop destination matched LUN 1's file")
    if any(c == "write" for c, _ in order):
        done.append("LUN 2's file matched the source after every write")
    print("CORRECTNESS: OK (" + "; ".join(done) + ")")
EOF

echo
echo "reproduce: SIZE=$SIZE RUNS=$RUNS CASES='$CASES' BLOCK=$BLOCK QD=$QD IPERF_SECONDS=$IPERF_SECONDS READ_PASSES=$READ_PASSES READ_SEGMENT_REF=$READ_SEGMENT_REF READ_CHECKSUM=$READ_CHECKSUM" \
    "WARM=$WARM TGT_PARAMS='$TGT_PARAMS' TGTD_ENV='$TGTD_ENV' VOLBACK_COPY_ARGS='${VOLBACK_COPY_ARGS:-}' BENCH_DIR=$BENCH_DIR" \
    "${TGT_PORT:+TGT_PORT=$TGT_PORT }VOLBACK=$VOLBACK bash $ORIG_CMD"

if (( FAILED )); then
    echo "iscsi.sh: at least one command failed or a check did not match (see FAIL above)" >&2
    exit 1
fi
