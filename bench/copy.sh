#!/usr/bin/env bash
# bench/copy.sh - compare `volback copy` against the usual peers on loop devices.
#
# Run (as root, from anywhere inside the repo):
#     bash bench/copy.sh
#
# What it does:
#   * creates two sources in the scratch dir: a dense one (all random data) and
#     "sparse10" (random 64 KiB pieces at random 64 KiB-aligned offsets until
#     10% of the size is data, the rest holes);
#   * attaches sources and a destination as loop devices with direct I/O;
#   * copies source loop -> destination loop with volback, dd bs=1M direct,
#     dd bs=4M (buffered + conv=fsync), qemu-img convert, RUNS times each,
#     round-robin with the order rotated each round (a tool's run is slowed
#     by the host still writing back the previous tool's data, so no tool
#     always follows the same one), dropping caches and resetting the
#     destination before every run, and checks the destination equals the
#     source after every run (read back: both devices read in full);
#   * measures fio's concurrent read+write ceiling on the same loop devices
#     (followed by the same read-back, so the next tool starts alike);
#   * prints a table of medians, ratios and PASS/MISS against the targets.
#
# Environment:
#   SIZE=2G          size of each source/destination (numfmt IEC: 256M, 2G, ...;
#                    must be a multiple of 1 MiB)
#   RUNS=3           runs per tool and case (median is reported)
#   VOLBACK=path     volback binary; if unset the script runs
#                    `cargo build --release -p volback-engine` and uses
#                    target/release/volback
#   VOLBACK_ARGS=".." extra flags for `volback copy` (word-split), e.g.
#                    VOLBACK_ARGS="--block-size 4M --queue-depth 32"
#   VOLBACK_VARIANTS="1M:32 2M:16"  extra volback runs with --block-size:--queue-depth,
#                    interleaved with the others (tools volback-1M:32, ...), to
#                    compare settings side by side; ratios against the peers are
#                    printed for each under the table
#   BENCH_DIR=/var/tmp/volback-bench  scratch dir (must not be tmpfs: the
#                    loop devices must sit on a real disk for the numbers
#                    to mean anything)
#   KEEP=1           keep the scratch dir at the end; the generated sources are
#                    then reused by the next run (they carry a marker file)
#   CASES="dense sparse10"  which cases to run
#   SKIP_VOLBACK=1   dev aid: omit volback (test the harness with the peers only)
#   SKIP_FIO=1       dev aid: omit the fio ceiling measurement
#
# Exit status: non-zero only if a copy failed or a destination did not match
# its source (FAIL in the table). Performance targets are informational.

set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- settings ---

SIZE=${SIZE:-2G}
RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp/volback-bench}
KEEP=${KEEP:-0}
CASES=${CASES:-dense sparse10}
SKIP_VOLBACK=${SKIP_VOLBACK:-0}
SKIP_FIO=${SKIP_FIO:-0}
read -ra VOLBACK_EXTRA <<<"${VOLBACK_ARGS:-}"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[[ $EUID -eq 0 ]] || die "must run as root (losetup, drop_caches)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"

SIZE_BYTES=$(numfmt --from=iec "$SIZE") || die "cannot parse SIZE=$SIZE"
(( SIZE_BYTES > 0 && SIZE_BYTES % (1024 * 1024) == 0 )) ||
    die "SIZE must be a positive multiple of 1 MiB (got $SIZE_BYTES bytes)"

# --------------------------------------------------------------- tools -------

# Install what is missing; apt-get update only once, and only if needed.
APT_UPDATED=0
need losetup mount
need qemu-img qemu-utils
need python3 python3
need cmp diffutils
(( SKIP_FIO )) || need fio fio

# ------------------------------------------------------- scratch + cleanup ---

# The scratch dir must be on a real disk; a tmpfs backing file would make the
# loop devices memory-speed and the direct-I/O settings meaningless.
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
FSTYPE=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
[[ $FSTYPE != tmpfs && $FSTYPE != ramfs ]] ||
    die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; pick a directory on a disk"

DST_FILE=$BENCH_DIR/dst.img
RESULTS=$BENCH_DIR/results.tsv   # case tool run seconds status
LOOPS=()                          # every loop device we attached

detach_loop() { # detach_loop DEV: detach and forget DEV
    local dev=$1 i
    # A just-finished writer can keep the device busy for a moment; retry.
    for i in 1 2 3 4 5; do
        losetup -d "$dev" 2>/dev/null && break
        sleep 0.5
    done
    local keep=()
    for i in "${LOOPS[@]}"; do [[ $i == "$dev" ]] || keep+=("$i"); done
    LOOPS=("${keep[@]}")
}

# Keep the script's own stdout/stderr on fds 3/4: a signal can arrive while
# a tool runs with its output redirected to a log, and cleanup's messages
# must not vanish into that log.
exec 3>&1 4>&2

cleanup() {
    local rc=$? dev f
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    for dev in "${LOOPS[@]}"; do losetup -d "$dev" 2>/dev/null; done
    # Belt and braces: a signal between `losetup --show` and `LOOPS+=` would
    # leave a device we do not know about, so also detach anything backed by
    # a file in our scratch dir.
    for f in "$BENCH_DIR"/*.img; do
        [[ -e $f ]] || continue
        for dev in $(losetup -n -O NAME -j "$f" 2>/dev/null); do
            losetup -d "$dev" 2>/dev/null
        done
    done
    if [[ $KEEP != 1 ]]; then
        # Only our own files (never rm -rf a user-supplied directory).
        rm -f -- "$BENCH_DIR"/src-*.img "$BENCH_DIR"/src-*.img.ok "$DST_FILE" \
            "$RESULTS" "$BENCH_DIR"/fio.json "$BENCH_DIR"/tool.log "$BENCH_DIR"/cmp.log
        rmdir -- "$BENCH_DIR" 2>/dev/null || true
    else
        echo "KEEP=1: scratch files kept in $BENCH_DIR"
    fi
    # Verify nothing of ours is left attached (other users' loops are fine).
    local left
    left=$(losetup -a | grep -F "$BENCH_DIR/" || true)
    if [[ -n $left ]]; then
        echo "copy.sh: WARNING: loop devices still attached:" >&2
        echo "$left" >&2
        (( rc )) || rc=3
    else
        echo "cleanup: no bench loop devices left attached (losetup -a checked)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT    # `exit` runs the EXIT trap, i.e. cleanup
trap 'exit 143' TERM

# Build after the traps are set, so an interrupted build still cleans up.
if (( ! SKIP_VOLBACK )); then
    ensure_volback
fi

# ---------------------------------------------------------------- sources ----

# Generate a source file unless a complete one (right size + marker saying it
# was fully written with the same parameters) is already there.
make_source() { # make_source CASE FILE
    local kind=$1 file=$2 marker="$2.ok" want="kind=$1 size=$SIZE_BYTES v=1"
    if [[ -f $file && -f $marker && $(stat -c %s "$file") == "$SIZE_BYTES" &&
          $(cat "$marker") == "$want" ]]; then
        log "reusing $kind source $file"
        return
    fi
    rm -f -- "$file" "$marker"
    log "generating $kind source $file ($SIZE_BYTES bytes)"
    python3 - "$kind" "$file" "$SIZE_BYTES" <<'EOF'
import os, random, sys
kind, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
MiB, PIECE = 1 << 20, 64 << 10
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    if kind == "dense":
        # os.urandom in 1 MiB pieces: fast enough (~hundreds of MB/s).
        for _ in range(size // MiB):
            os.write(fd, os.urandom(MiB))
    else:
        # 10% data: distinct random 64 KiB-aligned pieces of random bytes;
        # everything not written stays a hole.
        os.ftruncate(fd, size)
        nblocks = size // PIECE
        want = -(-nblocks // 10)  # ceil(10%)
        for b in sorted(random.sample(range(nblocks), want)):
            os.pwrite(fd, os.urandom(PIECE), b * PIECE)
    os.fsync(fd)
finally:
    os.close(fd)
EOF
    echo "$want" >"$marker"
}

declare -A SRC_LOOP
for c in $CASES; do
    case $c in dense|sparse10) ;; *) die "unknown case '$c'" ;; esac
    make_source "$c" "$BENCH_DIR/src-$c.img"
    # Read-only: no tool should ever write its source.
    attach "$BENCH_DIR/src-$c.img" --read-only
    SRC_LOOP[$c]=$ATTACHED
    log "$c source: $ATTACHED ($(du -h --apparent-size "$BENCH_DIR/src-$c.img" | cut -f1) logical," \
        "$(du -h "$BENCH_DIR/src-$c.img" | cut -f1) allocated)"
done

# Destination: recreated as an all-holes file and re-attached before every
# run, so no tool inherits a destination another tool filled (which would
# help tools that skip writing zeros or compare before writing). Fresh file =
# identical allocation work for everybody, in both cases.
DST_LOOP=
reset_dst() {
    if [[ -n $DST_LOOP ]]; then detach_loop "$DST_LOOP"; DST_LOOP=; fi
    rm -f -- "$DST_FILE"
    truncate -s "$SIZE_BYTES" "$DST_FILE"
    attach "$DST_FILE"
    DST_LOOP=$ATTACHED
}

reset_dst
log "loop devices (DIO should be 1):"
losetup -l -O NAME,DIO,RO,LOG-SEC,BACK-FILE | grep -e '^NAME' -e "$BENCH_DIR/"

# ------------------------------------------------------------------ tools ----

TOOLS=()
(( SKIP_VOLBACK )) || TOOLS+=(volback)
for v in ${VOLBACK_VARIANTS:-}; do
    [[ $v =~ ^[0-9]+[KMG]?:[0-9]+$ ]] || die "VOLBACK_VARIANTS: '$v' is not BLOCK:DEPTH (e.g. 1M:32)"
    TOOLS+=("volback-$v")
done
TOOLS+=(dd-1M-direct dd-4M-fsync qemu-img)
(( SKIP_FIO )) || TOOLS+=(fio-ceiling)

# Run TOOL copying $2 -> $3 (fio-ceiling: read $2 while writing $3).
run_tool() { # run_tool TOOL SRC DST
    local tool=$1 src=$2 dst=$3
    case $tool in
    volback)
        "$VOLBACK" copy --progress none "${VOLBACK_EXTRA[@]}" "$src" "$dst" ;;
    volback-*)
        local v=${tool#volback-}
        "$VOLBACK" copy --progress none --block-size "${v%%:*}" --queue-depth "${v##*:}" \
            "$src" "$dst" ;;
    dd-1M-direct) # what Cinder does
        dd if="$src" of="$dst" bs=1M iflag=direct oflag=direct status=none ;;
    dd-4M-fsync) # buffered; conv=fsync so the time includes getting the data to the device
        dd if="$src" of="$dst" bs=4M conv=fsync status=none ;;
    qemu-img)
        qemu-img convert -n -f raw -O raw -t none -T none -m 16 -W "$src" "$dst" ;;
    fio-ceiling)
        # One job reading the source, one writing the destination,
        # concurrently; a copy cannot beat the slower of the two.
        fio --output-format=json --output="$BENCH_DIR/fio.json" \
            --direct=1 --bs=1M --iodepth=16 --ioengine=io_uring \
            --size="$SIZE_BYTES" \
            --name=read --filename="$src" --rw=read \
            --name=write --filename="$dst" --rw=write ;;
    esac
}

# fio's ceiling in bytes/s = min(read bw, write bw) from its JSON report.
fio_ceiling_bps() {
    python3 - "$BENCH_DIR/fio.json" <<'EOF'
import json, sys
jobs = {j["jobname"]: j for j in json.load(open(sys.argv[1]))["jobs"]}
print(min(jobs["read"]["read"]["bw_bytes"], jobs["write"]["write"]["bw_bytes"]))
EOF
}

# ----------------------------------------------------------------- runs ------

: >"$RESULTS"
FAILED=0
log "SIZE=$SIZE ($SIZE_BYTES bytes) RUNS=$RUNS CASES='$CASES' tools: ${TOOLS[*]}"
(( SKIP_VOLBACK )) || log "volback: $VOLBACK copy --progress none ${VOLBACK_EXTRA[*]}"

for c in $CASES; do
    src=${SRC_LOOP[$c]}
    for (( run = 1; run <= RUNS; run++ )); do
        # Rotate the order from round to round, so no tool always runs
        # right after the same other one (the host's write-back of one
        # tool's data slows whichever tool comes next).
        n_tools=${#TOOLS[@]}
        for (( k = 0; k < n_tools; k++ )); do
            tool=${TOOLS[(k + run - 1) % n_tools]}
            reset_dst
            drop_caches
            t0=$EPOCHREALTIME
            status=OK
            if ! run_tool "$tool" "$src" "$DST_LOOP" >"$BENCH_DIR/tool.log" 2>&1; then
                status=FAIL
                echo "!! FAIL: $tool exited non-zero on $c run $run:" >&2
                sed 's/^/   | /' "$BENCH_DIR/tool.log" >&2
            fi
            t1=$EPOCHREALTIME
            secs=$(python3 -c "print(f'{$t1 - $t0:.3f}')")

            if [[ $tool == fio-ceiling ]]; then
                # fio writes its own pattern, so nothing to compare; its
                # "time" is the time to move SIZE at the ceiling rate.
                if [[ $status == OK ]]; then
                    bps=$(fio_ceiling_bps)
                    secs=$(python3 -c "print(f'{$SIZE_BYTES / $bps:.3f}')")
                fi
                # The same read-back as the copies' check below, so the
                # next tool starts from the same state after every tool.
                blockdev --flushbufs "$DST_LOOP"
                drop_caches
                cat -- "$src" "$DST_LOOP" >/dev/null
            elif [[ $status == OK ]]; then
                # Compare what is on the destination device, not what a
                # buffered writer left in the page cache: flush + drop first.
                blockdev --flushbufs "$DST_LOOP"
                drop_caches
                if ! cmp -n "$SIZE_BYTES" "$src" "$DST_LOOP" >"$BENCH_DIR/cmp.log" 2>&1; then
                    status=FAIL
                    echo "!! FAIL: destination differs from source after $tool ($c run $run):" >&2
                    sed 's/^/   | /' "$BENCH_DIR/cmp.log" >&2
                fi
            fi
            [[ $status == OK ]] || FAILED=1
            mbps=$(python3 -c "print(f'{$SIZE_BYTES / 1e6 / $secs:.1f}')")
            printf '   %-9s run %d/%d  %-12s %8.3f s  %8s MB/s  %s\n' \
                "$c" "$run" "$RUNS" "$tool" "$secs" "$mbps" "$status"
            printf '%s\t%s\t%d\t%s\t%s\n' "$c" "$tool" "$run" "$secs" "$status" >>"$RESULTS"
        done
    done
done

# ------------------------------------------------------------------ table ----

echo
python3 - "$RESULTS" "$SIZE_BYTES" <<'EOF'
import statistics, sys
from collections import defaultdict

path, size = sys.argv[1], int(sys.argv[2])
# Medians are over successful runs only: the time of a copy that crashed or
# produced wrong data means nothing.
times, fails, runs, order = defaultdict(list), defaultdict(int), defaultdict(int), []
for line in open(path):
    case, tool, run, secs, status = line.rstrip("\n").split("\t")
    if (case, tool) not in runs:
        order.append((case, tool))
    runs[(case, tool)] += 1
    if status == "OK":
        times[(case, tool)].append(float(secs))
    else:
        fails[(case, tool)] += 1

def median(case, tool):
    t = times.get((case, tool))
    return statistics.median(t) if t else None

def mbps(secs):
    return size / 1e6 / secs

# Minimum "volback vs tool" ratio per (case, tool). The ratio is
# tool_seconds / volback_seconds, which equals volback MB/s / tool MB/s
# (for fio-ceiling: the fraction of the ceiling volback reaches).
TARGETS = {
    ("dense", "dd-1M-direct"): 1.6,
    ("dense", "qemu-img"): 1.1,
    ("dense", "fio-ceiling"): 0.9,
    ("sparse10", "qemu-img"): 1.25,
}

print(f"Results: {size} bytes ({size / 2**30:g} GiB) per copy, "
      f"median of {max(runs.values())} run(s); MB = 10^6 bytes")
print("  dd-4M-fsync = dd bs=4M conv=fsync (buffered, fsync'd so the data is on the device)")
print("  fio-ceiling = min(read, write) bandwidth of one fio reader + one writer running together")
print("                (sparse10: fio writes every byte, so it is no ceiling for a copy that skips holes)")
print()
hdr = f"{'case':<9} {'tool':<13} {'median s':>9} {'MB/s':>8} {'check':>6}   {'volback vs tool':>15}  {'target':>8}"
print(hdr)
print("-" * len(hdr))
for case, tool in order:
    s = median(case, tool)
    n_fail = fails[(case, tool)]
    check = "-" if tool == "fio-ceiling" else ("OK" if n_fail == 0 else f"FAIL({n_fail})")
    if tool == "fio-ceiling" and n_fail:
        check = f"FAIL({n_fail})"
    if s is None:  # every run failed
        print(f"{case:<9} {tool:<13} {'-':>9} {'-':>8} {check:>6}")
        continue
    line = f"{case:<9} {tool:<13} {s:>9.3f} {mbps(s):>8.1f} {check:>6}"
    vb = median(case, "volback")
    if tool != "volback" and vb is not None:
        ratio = s / vb  # == volback MB/s / tool MB/s
        line += f"   {ratio:>14.2f}x"
        tgt = TARGETS.get((case, tool))
        if tgt is not None:
            ok = ratio >= tgt and fails[(case, "volback")] == 0
            line += f"  >={tgt:<4g}  {'PASS' if ok else 'MISS'}"
    elif vb is None and runs[(case, "volback")] and (case, tool) in TARGETS:
        line += f"   {'n/a':>15}  >={TARGETS[(case, tool)]:<4g}  MISS (volback failed)"
    print(line)
variants = [t for (c, t) in order if t.startswith("volback-")]
if variants:
    print()
    print("volback settings side by side (same runs; ratio = tool s / variant s):")
    for case in dict.fromkeys(c for c, _ in order):
        for v in dict.fromkeys(variants):
            vs = median(case, v)
            if vs is None:
                continue
            parts = []
            for peer in ("volback", "dd-1M-direct", "qemu-img", "fio-ceiling"):
                ps = median(case, peer)
                if ps is not None:
                    parts.append(f"{ps / vs:.2f}x {peer}")
            print(f"  {case:<9} {v:<16} {vs:8.3f} s  " + ", ".join(parts))
print()
if any(fails.values()):
    print("CORRECTNESS: FAIL (see rows marked FAIL and the messages above)")
else:
    print("CORRECTNESS: all destinations matched their sources")
EOF

if (( FAILED )); then
    echo "copy.sh: at least one copy failed or mismatched" >&2
    exit 1
fi
