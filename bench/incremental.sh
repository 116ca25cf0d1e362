#!/usr/bin/env bash
# bench/incremental.sh - incremental backups against full ones, per
# change-tracking source.
#
# Run (as root, from anywhere inside the repo):
#     bash bench/incremental.sh
#
# What it does, per case (change-tracking source):
#   * hash-map: source pool and vault pool are directories on the file
#     system of BENCH_DIR (ext4: no reflinks, so the engine compares block
#     hashes with the parent's block map);
#   * driver: the source pool is on an XFS file system (mkfs.xfs -m
#     reflink=1) made on a loop device over a sparse file in BENCH_DIR, the
#     vault is a directory on BENCH_DIR's file system, so the engine asks the
#     file driver which extents changed (FIEMAP on reflinked snapshots);
#   * writes a configuration (pools primary:gold and backup:vault, default
#     target backup:vault, catalog and map_block_size MAP_BLOCK), creates a
#     SIZE volume on primary:gold and fills all of it with random data (dd
#     into its volume-<id>.img from a pre-generated random file);
#   * RUNS times: deletes the previous run's backups (untimed), drops caches
#     and times a full backup; overwrites CHANGE_PCT% of the volume with new
#     random data in CHANGE_CHUNK pieces at random CHANGE_ALIGN-aligned,
#     non-overlapping offsets (recording the exact number of map blocks
#     touched and of changed ranges after merging adjacent pieces); drops
#     caches and times an incremental backup, checking that it is an
#     incremental and used the case's change tracking;
#   * restores the last incremental to a new volume and compares it with
#     the source volume byte for byte;
#   * prints a table of medians, ratios and PASS/MISS against the targets:
#       driver:   incremental time <= 15% of a full backup's time;
#       hash-map: incremental bytes written <= (map blocks touched + changed
#                 ranges) x map block size.
#
# Environment:
#   SIZE=2G          volume size (numfmt IEC; multiple of 1 MiB)
#   RUNS=3           full + change + incremental rounds (medians reported)
#   VOLBACK=path     volback binary; if unset the script runs
#                    `cargo build --release -p volback-engine` and uses
#                    target/release/volback
#   BENCH_DIR=/var/tmp/volback-bench-inc  scratch dir (a disk file system
#                    without reflinks, e.g. ext4; not tmpfs)
#   KEEP=1           keep the scratch files (file systems are unmounted and
#                    loop devices detached anyway)
#   CASES="hash-map driver"  which cases to run
#   MAP_BLOCK=256K   backup.map_block_size written into the configurations
#   CHANGE_PCT=5     percent of the volume overwritten before each incremental
#   CHANGE_CHUNK=1M  size of each overwritten piece
#   CHANGE_ALIGN=4K  alignment of the pieces' offsets (4K: pieces usually
#                    straddle map blocks; MAP_BLOCK: they never do)
#   VAULT_FS=xfs     xfs (default): the vault gets its own reflink XFS on a
#                    loop device, as a file-pool backup target should (its
#                    restore-point snapshots are reflinks);
#                    ext4: the vault is a directory in BENCH_DIR, and every
#                    restore point is a full data copy of the volume
#   VERIFY=          unset: the engine's default for backup.copy.verify
#                    (true: every backup reads back what it wrote to check
#                    the block map: a full its whole destination, an
#                    incremental only the blocks it wrote);
#                    0 or 1: write `copy: {verify: false|true}` into the
#                    configurations
#   SEED=n           seed for the changed ranges (default: random, printed)
#   VOLBACK_LOG=warn volback's log filter (its stderr is shown on failures)
#
# Exit status: non-zero only if a backup or restore failed, an incremental
# was not an incremental of the expected change tracking, or the restored
# volume differs from the source (FAIL). Performance targets are
# informational (PASS/MISS).

set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- settings ---

SIZE=${SIZE:-2G}
RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp/volback-bench-inc}
KEEP=${KEEP:-0}
CASES=${CASES:-hash-map driver}
MAP_BLOCK=${MAP_BLOCK:-256K}
CHANGE_PCT=${CHANGE_PCT:-5}
CHANGE_CHUNK=${CHANGE_CHUNK:-1M}
CHANGE_ALIGN=${CHANGE_ALIGN:-4K}
VAULT_FS=${VAULT_FS:-xfs}
VERIFY=${VERIFY:-}
SEED=${SEED:-$(( (RANDOM << 15) | RANDOM ))}
export VOLBACK_LOG=${VOLBACK_LOG:-warn}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MARKER=.volback-bench-incremental   # marks directories this script made

[[ $EUID -eq 0 ]] || die "must run as root (losetup, mount, drop_caches)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
[[ $CHANGE_PCT =~ ^[1-9][0-9]?$ ]] || die "CHANGE_PCT must be an integer 1..99"
[[ $VAULT_FS == ext4 || $VAULT_FS == xfs ]] || die "VAULT_FS must be ext4 or xfs"
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer"
case $VERIFY in
'') VERIFY_YAML= ; VERIFY_SAY="engine default" ;;
0|false) VERIFY_YAML=$'\n  copy:\n    verify: false'; VERIFY_SAY=false ;;
1|true) VERIFY_YAML=$'\n  copy:\n    verify: true'; VERIFY_SAY=true ;;
*) die "VERIFY must be unset, 0 or 1" ;;
esac
for c in $CASES; do
    case $c in hash-map|driver) ;; *) die "unknown case '$c' (hash-map, driver)" ;; esac
done

SIZE_BYTES=$(bytes SIZE "$SIZE")
MAP_BYTES=$(bytes MAP_BLOCK "$MAP_BLOCK")
CHUNK_BYTES=$(bytes CHANGE_CHUNK "$CHANGE_CHUNK")
ALIGN_BYTES=$(bytes CHANGE_ALIGN "$CHANGE_ALIGN")
MiB=$((1024 * 1024))
(( SIZE_BYTES > 0 && SIZE_BYTES % MiB == 0 )) ||
    die "SIZE must be a positive multiple of 1 MiB (got $SIZE_BYTES bytes)"
(( MAP_BYTES > 0 && MAP_BYTES % 4096 == 0 )) ||
    die "MAP_BLOCK must be a positive multiple of 4 KiB (got $MAP_BYTES bytes)"
(( ALIGN_BYTES > 0 && ALIGN_BYTES % 512 == 0 )) ||
    die "CHANGE_ALIGN must be a positive multiple of 512 (got $ALIGN_BYTES bytes)"
(( CHUNK_BYTES > 0 && CHUNK_BYTES * 4 <= SIZE_BYTES )) ||
    die "CHANGE_CHUNK must be positive and at most SIZE/4 (got $CHUNK_BYTES bytes)"
(( CHANGE_PCT <= 50 )) || die "CHANGE_PCT above 50 leaves no room for non-overlapping random pieces"

# --------------------------------------------------------------- tools -------

APT_UPDATED=0
need losetup mount
need findmnt util-linux
need python3 python3
need cmp diffutils
[[ " $CASES " == *" driver "* || $VAULT_FS == xfs ]] && need mkfs.xfs xfsprogs

# ------------------------------------------------------- scratch + cleanup ---

[[ $BENCH_DIR != *[[:space:]]* ]] || die "BENCH_DIR must not contain white space"
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
[[ $BENCH_DIR != / ]] || die "BENCH_DIR must not be /"
FSTYPE=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
case $FSTYPE in
tmpfs|ramfs) die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; pick a directory on a disk" ;;
xfs|btrfs) die "BENCH_DIR=$BENCH_DIR is on $FSTYPE, which reflinks: the hash-map case and the" \
               "ext4 vault need a file system without reflinks (ext4); pick another BENCH_DIR" ;;
esac
# A mount left under BENCH_DIR by an earlier, killed run: refuse rather than
# delete files under it.
if findmnt -rn -o TARGET | grep -qF "$BENCH_DIR/"; then
    die "something is mounted under $BENCH_DIR (an earlier run?):" \
        "$(findmnt -rn -o TARGET | grep -F "$BENCH_DIR/" | tr '\n' ' ')- unmount it first"
fi

RAND_FILE=$BENCH_DIR/random-fill.bin
RESULTS=$BENCH_DIR/results.tsv
TOOL_LOG=$BENCH_DIR/tool.log
OUT_JSON=$BENCH_DIR/out.json
CASE_DIRS=()   # case directories this run created
MOUNTS=()      # mount points this run mounted
FS_LOOPS=()    # loop devices this run attached for file systems

exec 3>&1 4>&2   # cleanup's messages must not vanish into a tool's log

# Loop devices (NAME BACK-FILE) whose backing file is under $1/.
loops_under() {
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v p="$1/" 'index($2, p) == 1 { print $1 }'
}

umount_retry() { # umount_retry MOUNTPOINT
    local i
    for i in 1 2 3 4 5 6; do
        umount "$1" 2>/dev/null && return 0
        mountpoint -q "$1" || return 0
        sleep 0.5
    done
    echo "incremental.sh: WARNING: could not unmount $1" >&2
    return 1
}

# Undo everything under a case directory: loop devices volback (or a crash)
# left on pool images, our mounts, our file-system loop devices; then remove
# the directory unless KEEP=1.
teardown_dir() { # teardown_dir DIR
    local dir=$1 dev m i ok=1 fsdev keep
    for dev in $(loops_under "$dir"); do
        keep=0
        for fsdev in "${FS_LOOPS[@]}"; do [[ $dev == "$fsdev" ]] && keep=1; done
        # A file-system loop's backing file sits directly in DIR; volback's
        # would be inside a pool (possibly inside the mount): detach those first.
        (( keep )) || detach_retry "$dev" || ok=0
    done
    for (( i = ${#MOUNTS[@]} - 1; i >= 0; i-- )); do
        m=${MOUNTS[i]}
        [[ $m == "$dir/"* ]] || continue
        if umount_retry "$m"; then unset 'MOUNTS[i]'; else ok=0; fi
    done
    MOUNTS=("${MOUNTS[@]}")
    for dev in $(loops_under "$dir"); do detach_retry "$dev" || ok=0; done
    local left=()
    for dev in "${FS_LOOPS[@]}"; do losetup "$dev" >/dev/null 2>&1 && left+=("$dev"); done
    FS_LOOPS=("${left[@]}")
    if [[ $KEEP != 1 ]]; then
        if (( ok )) && ! findmnt -rn -o TARGET | grep -qF "$dir/"; then
            rm -rf --one-file-system -- "$dir"
        else
            echo "incremental.sh: WARNING: not removing $dir (something is still mounted or attached)" >&2
        fi
    fi
    return $(( ! ok ))
}

cleanup() {
    local rc=$? d
    trap - EXIT INT TERM
    set +e
    exec 1>&3 2>&4
    for d in "${CASE_DIRS[@]}"; do [[ -d $d ]] && teardown_dir "$d"; done
    # Belt and braces: anything else of ours still attached or mounted.
    for d in $(findmnt -rn -o TARGET | grep -F "$BENCH_DIR/" | sort -r); do umount_retry "$d"; done
    for d in $(loops_under "$BENCH_DIR"); do detach_retry "$d"; done
    if [[ $KEEP != 1 ]]; then
        rm -f -- "$RAND_FILE" "$RAND_FILE.ok" "$RESULTS" "$TOOL_LOG" "$OUT_JSON"
        rmdir -- "$BENCH_DIR" 2>/dev/null || true
    else
        echo "KEEP=1: scratch files kept in $BENCH_DIR"
    fi
    local left_loops left_mounts
    left_loops=$(losetup -a | grep -F "$BENCH_DIR/" || true)
    left_mounts=$(findmnt -rn -o TARGET | grep -F "$BENCH_DIR" || true)
    if [[ -n $left_loops || -n $left_mounts ]]; then
        echo "incremental.sh: WARNING: left behind:" >&2
        [[ -z $left_loops ]] || echo "$left_loops" >&2
        [[ -z $left_mounts ]] || echo "$left_mounts" >&2
        (( rc )) || rc=3
    else
        echo "cleanup: no bench loop devices or mounts left (losetup -a, findmnt checked)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT    # `exit` runs the EXIT trap, i.e. cleanup
trap 'exit 143' TERM

# Room: the random fill file, plus per case (run one at a time, removed
# after it) the volume, a full backup volume, its two restore points (data
# copies on ext4), the restored volume and some slack.
need_room $(( SIZE_BYTES * 7 + 1024 * MiB ))

ensure_volback

now() { echo "$EPOCHREALTIME"; }

# An XFS with reflinks on a loop device over a sparse file DIR/NAME.xfs.img,
# mounted on DIR/NAME.
make_xfs() { # make_xfs DIR NAME BYTES
    local img=$1/$2.xfs.img mnt=$1/$2 dev
    truncate -s "$3" "$img"
    dev=$(losetup --find --show --direct-io=on "$img")
    FS_LOOPS+=("$dev")
    mkfs.xfs -q -f -m reflink=1 "$dev"
    mkdir -p "$mnt"
    mount "$dev" "$mnt"
    MOUNTS+=("$mnt")
    log "  XFS (reflink=1) on $dev mounted at $mnt"
}

# Sets CFG, SRC_DIR (the primary:gold pool directory) for case $1.
setup_case() { # setup_case CASE
    local c=$1 d=$BENCH_DIR/$1 vault
    if [[ -e $d ]]; then
        [[ -e $d/$MARKER ]] || die "$d exists and was not made by this script; remove it or pick another BENCH_DIR"
        rm -rf --one-file-system -- "$d"
    fi
    mkdir -p "$d"
    : >"$d/$MARKER"
    CASE_DIRS+=("$d")
    if [[ $c == driver ]]; then
        # Volume + snapshots (shared extents, plus the changes) + the
        # restored volume, with room to spare; the file is sparse.
        make_xfs "$d" src $(( SIZE_BYTES * 3 + 1024 * MiB ))
        SRC_DIR=$d/src/gold
    else
        SRC_DIR=$d/primary/gold
    fi
    if [[ $VAULT_FS == xfs ]]; then
        make_xfs "$d" vault $(( SIZE_BYTES * 4 + 1024 * MiB ))
        vault=$d/vault/vault
    else
        vault=$d/backup/vault
    fi
    mkdir -p "$SRC_DIR" "$vault"
    CFG=$d/volback.yaml
    cat >"$CFG" <<EOF
# bench/incremental.sh, case $c
backends:
  - name: primary
    driver: file
    pools:
      gold: $SRC_DIR
  - name: backup
    driver: file
    pools:
      vault: $vault
backup:
  default_target: backup:vault
  catalog: $d/catalog.db
  map_block_size: $MAP_BYTES$VERIFY_YAML
EOF
    "$VOLBACK" --config "$CFG" check-config | sed 's/^/   | /'
}

vb() { "$VOLBACK" --config "$CFG" "$@"; }

# Runs volback with stdout to $OUT_JSON and stderr to $TOOL_LOG; on failure
# shows the log and returns 1.
vb_json() {
    if vb "$@" >"$OUT_JSON" 2>"$TOOL_LOG"; then
        return 0
    fi
    echo "!! FAIL: volback $* exited non-zero:" >&2
    show_tool_log
    return 1
}

# Fields of a backup record in $OUT_JSON: id mode tracking read written note.
backup_fields() {
    python3 - "$OUT_JSON" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["id"], d["mode"], d["change_tracking"], d["bytes_read"], d["bytes_written"],
      d.get("note") or "-")
EOF
}

# Overwrites CHANGE_PCT% of FILE with fresh random data in CHUNK pieces at
# random ALIGN-aligned non-overlapping offsets; prints
# "changed_bytes ranges map_blocks_touched".
change_volume() { # change_volume FILE SEED
    python3 - "$1" "$SIZE_BYTES" "$MAP_BYTES" "$CHUNK_BYTES" "$ALIGN_BYTES" "$CHANGE_PCT" "$2" <<'EOF'
import bisect, os, random, sys
path = sys.argv[1]
size, mb, chunk, align, pct, seed = map(int, sys.argv[2:])
rng = random.Random(seed)
want = -(-size * pct // (100 * chunk))      # ceil(pct% of size / chunk)
slots = (size - chunk) // align + 1         # aligned offsets a piece fits at
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
fd = os.open(path, os.O_WRONLY)
try:
    for off in offs:
        os.pwrite(fd, os.urandom(chunk), off)
    os.fsync(fd)
finally:
    os.close(fd)
ranges, end = 0, -1
blocks = set()
for off in offs:                            # sorted; adjacent pieces merge
    if off != end:
        ranges += 1
    end = off + chunk
    blocks.update(range(off // mb, (end - 1) // mb + 1))
print(len(offs) * chunk, ranges, len(blocks))
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

# ----------------------------------------------------------------- runs ------

: >"$RESULTS"
FAILED=0
log "SIZE=$SIZE ($SIZE_BYTES bytes) RUNS=$RUNS CASES='$CASES' VAULT_FS=$VAULT_FS" \
    "backup.copy.verify=$VERIFY_SAY"
log "map_block_size=$MAP_BYTES ($(numfmt --to=iec "$MAP_BYTES")); changes: $CHANGE_PCT% in" \
    "$CHANGE_CHUNK pieces at $CHANGE_ALIGN-aligned offsets, SEED=$SEED"
log "volback: $VOLBACK ($("$VOLBACK" --version))"
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (others' work skews the times)"

case_index=0
for c in $CASES; do
    case_index=$(( case_index + 1 ))
    echo
    log "case $c: setting up under $BENCH_DIR/$c"
    setup_case "$c"
    if ! vb volume create primary:gold --size "$SIZE_BYTES" --name bench >"$OUT_JSON" 2>"$TOOL_LOG"; then
        show_tool_log
        die "volume create failed"
    fi
    VOL=$(tail -1 "$OUT_JSON")
    VOL_FILE=$SRC_DIR/volume-${VOL##*/}.img
    [[ -f $VOL_FILE ]] || die "volume file $VOL_FILE not found (volume create printed '$VOL')"
    log "  volume $VOL; filling it with random data"
    dd if="$RAND_FILE" of="$VOL_FILE" bs=4M conv=notrunc,fsync status=none
    sync

    case_failed=0
    prev_ids=()
    last_incr=
    for (( run = 1; run <= RUNS; run++ )); do
        # The previous round's backups go (untimed): every round starts
        # from one fresh full backup, and the disk use stays bounded.
        for (( i = ${#prev_ids[@]} - 1; i >= 0; i-- )); do
            vb backup delete "${prev_ids[i]}" >"$TOOL_LOG" 2>&1 ||
                die_log "backup delete ${prev_ids[i]} failed"
        done
        prev_ids=()

        # Full backup.
        drop_caches
        t0=$(now)
        vb_json backup create "$VOL" --json --progress none || { case_failed=1; break; }
        t1=$(now)
        read -r f_id f_mode f_track f_read f_written f_note < <(backup_fields)
        prev_ids+=("$f_id")
        f_secs=$(elapsed "$t0" "$t1")
        if [[ $f_mode != full || $f_track != full ]]; then
            echo "!! FAIL: $c run $run: a plain backup was mode=$f_mode change_tracking=$f_track," \
                 "not full" >&2
            [[ $f_note == - ]] || echo "   note: $f_note" >&2
            case_failed=1; break
        fi
        printf '   %-8s run %d/%d  full         %8.3f s  read %12d  written %12d\n' \
            "$c" "$run" "$RUNS" "$f_secs" "$f_read" "$f_written"

        # Change CHANGE_PCT% of the volume.
        read -r ch_bytes ch_ranges ch_blocks < <(change_volume "$VOL_FILE" $(( SEED + 1000 * case_index + run )))
        printf '   %-8s run %d/%d  changed %d bytes in %d ranges, %d map blocks touched\n' \
            "$c" "$run" "$RUNS" "$ch_bytes" "$ch_ranges" "$ch_blocks"

        # Incremental backup.
        drop_caches
        t0=$(now)
        vb_json backup create "$VOL" --incremental --json --progress none || { case_failed=1; break; }
        t1=$(now)
        read -r i_id i_mode i_track i_read i_written i_note < <(backup_fields)
        prev_ids+=("$i_id")
        last_incr=$i_id
        i_secs=$(elapsed "$t0" "$t1")
        printf '   %-8s run %d/%d  incremental  %8.3f s  read %12d  written %12d  (%s, tracking %s)\n' \
            "$c" "$run" "$RUNS" "$i_secs" "$i_read" "$i_written" "$i_mode" "$i_track"
        if [[ $i_mode != incremental || $i_track != "$c" ]]; then
            echo "!! FAIL: $c run $run: the incremental was mode=$i_mode change_tracking=$i_track," \
                 "expected incremental with change_tracking=$c" >&2
            [[ $i_note == - ]] || echo "   note: $i_note" >&2
            if [[ -s $TOOL_LOG ]]; then show_tool_log; fi
            [[ $c == driver ]] && echo "   (is the file driver's FIEMAP change tracking in this build?" \
                "VOLBACK_LOG=info shows why it was not used)" >&2
            case_failed=1
        fi
        printf '%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
            "$c" "$run" "$f_secs" "$f_read" "$f_written" "$i_secs" "$i_read" "$i_written" \
            "$i_mode" "$i_track" "$ch_bytes" "$ch_ranges" "$ch_blocks" "$MAP_BYTES" >>"$RESULTS"
        (( ! case_failed )) || break
    done

    # Correctness: the last incremental, restored, equals the source.
    if (( ! case_failed )) && [[ -n $last_incr ]]; then
        log "  restoring the last incremental ($last_incr) and comparing it with the source"
        if vb_json restore "$last_incr" --to primary:gold --name check --json --progress none; then
            r_vol=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["volume"])' "$OUT_JSON")
            r_file=$SRC_DIR/volume-$r_vol.img
            if cmp -n "$SIZE_BYTES" "$VOL_FILE" "$r_file" >"$TOOL_LOG" 2>&1 &&
               [[ $(stat -c %s "$r_file") == "$SIZE_BYTES" ]]; then
                log "  restored volume identical to the source ($SIZE_BYTES bytes)"
                printf '%s\tcheck\tOK\n' "$c" >>"$RESULTS"
            else
                echo "!! FAIL: $c: the restored volume differs from the source:" >&2
                show_tool_log
                case_failed=1
            fi
        else
            case_failed=1
        fi
    fi
    (( case_failed )) && { printf '%s\tcheck\tFAIL\n' "$c" >>"$RESULTS"; FAILED=1; }

    log "case $c: tearing down"
    teardown_dir "$BENCH_DIR/$c" || true
done

# ------------------------------------------------------------------ table ----

echo
log "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RESULTS" "$SIZE_BYTES" "$VAULT_FS" "$CHANGE_PCT" "$CHANGE_CHUNK" "$CHANGE_ALIGN" \
    "$VERIFY_SAY" <<'EOF'
import statistics, sys
from collections import defaultdict

path, size, vault_fs, pct, chunk, align, verify = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rows, check, order = defaultdict(list), {}, []
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if f[1] == "check":
        check[f[0]] = f[2]
        continue
    c = f[0]
    if c not in order:
        order.append(c)
    rows[c].append(dict(
        f_secs=float(f[2]), f_read=int(f[3]), f_written=int(f[4]),
        i_secs=float(f[5]), i_read=int(f[6]), i_written=int(f[7]),
        i_mode=f[8], i_track=f[9], ch_bytes=int(f[10]), ranges=int(f[11]),
        blocks=int(f[12]), mb=int(f[13])))

def med(c, k):
    return statistics.median(r[k] for r in rows[c])

def mib(b):
    return f"{b / 2**20:.1f}"

nruns = max((len(v) for v in rows.values()), default=0)
print(f"Results: {size} bytes ({size / 2**30:g} GiB) volume, {pct}% changed per incremental "
      f"({chunk} pieces, {align}-aligned), vault on {vault_fs}, backup.copy.verify {verify}; "
      f"median of {nruns} run(s)")
print("  full s / incr s: wall time of `volback backup create` (caches dropped before each)")
print("  incr rd = the engine's bytes_read (source only: a verify pass reading the destination back is not in it)")
print("  bound = (map blocks touched + changed ranges) x map block; min = map blocks touched x map block")
print()
hdr = (f"{'case':<9} {'tracking':<9} {'full s':>8} {'incr s':>8} {'incr/full':>9}  {'target':<12}")
print(hdr)
print("-" * len(hdr))
for c in order:
    ratio = med(c, "i_secs") / med(c, "f_secs")
    tracks = sorted({r["i_track"] for r in rows[c]})
    tgt = ""
    if c == "driver":
        ok = ratio <= 0.15 and tracks == ["driver"]
        tgt = f"<=0.15 {'PASS' if ok else 'MISS'}"
    print(f"{c:<9} {','.join(tracks):<9} {med(c, 'f_secs'):>8.3f} {med(c, 'i_secs'):>8.3f} "
          f"{ratio:>9.3f}  {tgt:<12}")
print()
hdr = (f"{'case':<9} {'changed':>8} {'ranges':>6} {'blocks':>6} {'map':>5} {'min':>8} {'bound':>8} "
       f"{'incr wr':>8} {'wr/bound':>8} {'incr rd':>8} {'full wr':>8}  {'target':<14}")
print(hdr + "   (MiB unless noted; map in KiB)")
print("-" * len(hdr))
for c in order:
    rs = rows[c]
    bounds = [(r["blocks"] + r["ranges"]) * r["mb"] for r in rs]
    mins = [r["blocks"] * r["mb"] for r in rs]
    within = all(r["i_written"] <= b for r, b in zip(rs, bounds))
    tgt = ""
    if c == "hash-map":
        tgt = f"<=bound {'PASS' if within else 'MISS'}"
    else:
        tgt = f"({'within' if within else 'over'} bound)"
    print(f"{c:<9} {mib(med(c, 'ch_bytes')):>8} {statistics.median(r['ranges'] for r in rs):>6g} "
          f"{statistics.median(r['blocks'] for r in rs):>6g} {rs[0]['mb'] // 1024:>5} "
          f"{mib(statistics.median(mins)):>8} {mib(statistics.median(bounds)):>8} "
          f"{mib(med(c, 'i_written')):>8} "
          f"{statistics.median(r['i_written'] / b for r, b in zip(rs, bounds)):>8.3f} "
          f"{mib(med(c, 'i_read')):>8} {mib(med(c, 'f_written')):>8}  {tgt:<14}")
print()
bad = [c for c in order if check.get(c) != "OK"] + [c for c in check if c not in order]
if bad:
    print(f"CORRECTNESS: FAIL ({', '.join(sorted(set(bad)))}; see the messages above)")
else:
    print("CORRECTNESS: every case's last incremental restored identical to its source")
EOF

if (( FAILED )); then
    echo "incremental.sh: at least one case failed (see FAIL above)" >&2
    exit 1
fi
