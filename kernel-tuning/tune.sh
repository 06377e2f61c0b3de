#!/usr/bin/env bash
# Kernel and resource-limit tuning for a Switchboard host.
#
#   tune.sh plan   --connections N [--bytes-per-conn B]   show current -> recommended
#   tune.sh apply  --connections N [--bytes-per-conn B] --yes   write drop-ins, set live
#   tune.sh check  --connections N [--bytes-per-conn B]   exit 1 naming each shortfall
#   tune.sh revert --yes                                  restore what apply replaced
#
# Every path is taken relative to a system root: --root DIR, else $SWITCHBOARD_SYSROOT,
# else /. Tests point it at a fake tree (proc/sys/..., etc/...) so they never touch the
# host. apply and revert print what they would do and change nothing without --yes.
#
# Sizing (the same formulas `switchboard doctor` uses):
#   fd_target  = N + N/10 + 65536   one fd per connection, 10% for reconnect storms
#                                   (old sockets not yet closed), 65536 for listeners,
#                                   log segments, the metadata database and the admin port
#   tcp_pages  = ceil(N * B / 4096) socket buffer memory if every connection holds B bytes
#                                   of queued data at once (B defaults to 4000, the idle
#                                   kernel cost per socket measured on the reference host)
#   memlock    = 64 MiB per shard   io_uring rings and provided-buffer rings
set -euo pipefail

readonly PAGE_BYTES=4096
readonly DROPIN_NAME=90-switchboard.conf

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --connections N      target concurrent connections (plan, apply, check)
  --bytes-per-conn B   kernel socket-buffer budget per connection, bytes (default 4000)
  --shards S           shard count, for the memlock limit (default: online CPUs)
  --user NAME          account the limits apply to (default switchboard)
  --root DIR           system root to read and write (default $SWITCHBOARD_SYSROOT or /)
  --yes                really change things (apply, revert); otherwise a dry run
  --help               this text
EOF
}

die() {
    printf 'tune.sh: %s\n' "$*" >&2
    exit 2
}

MODE=""
CONNECTIONS=""
BYTES_PER_CONN=4000
SHARDS=""
SERVICE_USER=switchboard
ROOT="${SWITCHBOARD_SYSROOT:-/}"
YES=0

while (($# > 0)); do
    case "$1" in
        plan | apply | check | revert)
            [[ -z "$MODE" ]] || die "only one of plan|apply|check|revert"
            MODE="$1"
            ;;
        --connections) CONNECTIONS="${2:?--connections needs a value}"; shift ;;
        --connections=*) CONNECTIONS="${1#*=}" ;;
        --bytes-per-conn) BYTES_PER_CONN="${2:?--bytes-per-conn needs a value}"; shift ;;
        --bytes-per-conn=*) BYTES_PER_CONN="${1#*=}" ;;
        --shards) SHARDS="${2:?--shards needs a value}"; shift ;;
        --shards=*) SHARDS="${1#*=}" ;;
        --user) SERVICE_USER="${2:?--user needs a value}"; shift ;;
        --user=*) SERVICE_USER="${1#*=}" ;;
        --root) ROOT="${2:?--root needs a value}"; shift ;;
        --root=*) ROOT="${1#*=}" ;;
        --yes) YES=1 ;;
        --help | -h) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

[[ -n "$MODE" ]] || { usage >&2; exit 2; }
[[ -d "$ROOT" ]] || die "root $ROOT is not a directory"
ROOT="${ROOT%/}"

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

if [[ "$MODE" != revert ]]; then
    if ! is_uint "$CONNECTIONS" || ((CONNECTIONS == 0)); then
        die "--connections N (a positive integer) is required"
    fi
fi
if ! is_uint "$BYTES_PER_CONN" || ((BYTES_PER_CONN == 0)); then
    die "--bytes-per-conn must be a positive integer"
fi

# Online CPUs from a list like "0-3,8-11".
count_cpus() {
    local online="$ROOT/sys/devices/system/cpu/online" total=0 part lo hi
    if [[ -r "$online" ]]; then
        local -a parts
        IFS=, read -r -a parts <"$online"
        for part in "${parts[@]}"; do
            lo="${part%-*}"
            hi="${part#*-}"
            total=$((total + hi - lo + 1))
        done
        printf '%s\n' "$total"
    else
        nproc
    fi
}

if [[ -z "$SHARDS" ]]; then
    SHARDS="$(count_cpus)"
fi
if ! is_uint "$SHARDS" || ((SHARDS == 0)); then
    die "--shards must be a positive integer"
fi

ETC_SYSCTL="$ROOT/etc/sysctl.d/$DROPIN_NAME"
ETC_LIMITS="$ROOT/etc/security/limits.d/$DROPIN_NAME"
BACKUP_DIR="$ROOT/var/backups/switchboard-tuning"

# --- the settings -----------------------------------------------------------------
# Each entry: key|kind|recommended|reason. Kinds:
#   min     current must be >= recommended (a larger value is kept)
#   max     current must be <= recommended (a smaller value is kept)
#   eq      current must equal recommended
#   vecmin  each field must be >= the recommended field (larger fields are kept)
#   range   "lo hi": the current range must cover the recommended one
#   advice  recommended and written by apply, but check only notes a difference
#   opt-min like min, but the key exists only when its module is loaded
SETTINGS=()
build_settings() {
    local n="$CONNECTIONS" fd_target tcp_pages
    fd_target=$((n + n / 10 + 65536))
    tcp_pages=$(((n * BYTES_PER_CONN + PAGE_BYTES - 1) / PAGE_BYTES))
    FD_TARGET="$fd_target"
    SETTINGS=(
        "fs.nr_open|min|$fd_target|per-process fd ceiling; RLIMIT_NOFILE cannot exceed it (fd_target = N + N/10 + 65536)"
        "fs.file-max|min|$((fd_target * 2))|system-wide open files: the server's fd_target plus the rest of the host"
        "net.core.somaxconn|min|65535|accept queue per listener; a reconnect storm after a restart arrives at once"
        "net.ipv4.tcp_max_syn_backlog|min|65535|half-open connections queued per listener during a storm"
        "net.ipv4.tcp_syncookies|eq|1|keep accepting under a SYN flood once the backlog is full"
        "net.core.netdev_max_backlog|min|16384|packets queued per CPU between the NIC and TCP during bursts"
        "net.ipv4.tcp_mem|vecmin|$tcp_pages $((tcp_pages * 3 / 2)) $((tcp_pages * 2))|socket buffer pages (low pressure high); pressure starts at N x B bytes = $tcp_pages pages"
        "net.ipv4.tcp_rmem|advice|4096 16384 1048576|small default receive buffer: messages are small, idle sockets should not autotune large"
        "net.ipv4.tcp_wmem|advice|4096 16384 1048576|small default send buffer: the server coalesces frames, a 16 KiB start is enough"
        "net.ipv4.tcp_slow_start_after_idle|eq|0|mobile clients idle for minutes then burst; keep the congestion window"
        "net.ipv4.ip_local_port_range|range|10240 65535|ephemeral ports for load generators and outgoing calls (reserve the server port with ip_local_reserved_ports)"
        "net.ipv4.tcp_tw_reuse|eq|1|load generators reuse TIME_WAIT ports for new outgoing connections"
        "net.ipv4.tcp_fin_timeout|max|15|release orphaned FIN_WAIT_2 sockets of vanished clients sooner"
        "net.ipv4.tcp_keepalive_time|max|300|find dead mobile peers behind NATs within minutes, not the 2 h default"
        "net.ipv4.tcp_keepalive_intvl|max|30|seconds between keepalive probes"
        "net.ipv4.tcp_keepalive_probes|max|4|probes before a silent peer is declared dead (300 + 4 x 30 s)"
        "vm.max_map_count|min|262144|each log segment is one mapping; shards x segments plus executor memory"
        "kernel.io_uring_disabled|eq|0|the server's sockets and log run on io_uring"
        "net.netfilter.nf_conntrack_max|opt-min|$fd_target|if conntrack is loaded, every connection takes an entry; a full table drops packets"
    )
}

# --- functions ----------------------------------------------------------------------
sysctl_path() { printf '%s/proc/sys/%s\n' "$ROOT" "${1//./\/}"; }

# Reads a sysctl, whitespace-normalised; prints nothing if absent.
read_sysctl() {
    local path
    path="$(sysctl_path "$1")"
    [[ -r "$path" ]] || return 0
    tr -s '[:space:]' ' ' <"$path" | sed 's/^ //; s/ $//'
}

# The value apply would set: recommended, except where the current value is already
# better (larger for min kinds, smaller for max), which is kept.
target_value() {
    local kind="$1" current="$2" recommended="$3"
    local -a cur rec out
    case "$kind" in
        min | opt-min)
            if is_uint "$current" && ((current >= recommended)); then echo "$current"; else echo "$recommended"; fi ;;
        max)
            if is_uint "$current" && ((current <= recommended)); then echo "$current"; else echo "$recommended"; fi ;;
        vecmin)
            read -r -a cur <<<"$current"
            read -r -a rec <<<"$recommended"
            out=()
            local i
            for i in "${!rec[@]}"; do
                if is_uint "${cur[i]:-}" && ((cur[i] >= rec[i])); then out+=("${cur[i]}"); else out+=("${rec[i]}"); fi
            done
            echo "${out[*]}" ;;
        range)
            read -r -a cur <<<"$current"
            read -r -a rec <<<"$recommended"
            if is_uint "${cur[0]:-}" && is_uint "${cur[1]:-}"; then
                echo "$((cur[0] < rec[0] ? cur[0] : rec[0])) $((cur[1] > rec[1] ? cur[1] : rec[1]))"
            else
                echo "$recommended"
            fi ;;
        eq | advice) echo "$recommended" ;;
        *) die "internal: unknown kind $kind" ;;
    esac
}

# Prints "key|kind|current|target|reason" for every setting, current "" when absent.
each_setting() {
    local entry key kind recommended reason current target
    for entry in "${SETTINGS[@]}"; do
        IFS='|' read -r key kind recommended reason <<<"$entry"
        current="$(read_sysctl "$key")"
        target="$(target_value "$kind" "$current" "$recommended")"
        printf '%s|%s|%s|%s|%s\n' "$key" "$kind" "$current" "$target" "$reason"
    done
}

limits_content() {
    local memlock_kib=$((SHARDS * 65536))
    cat <<EOF
# Generated by kernel-tuning/tune.sh for $CONNECTIONS connections, $SHARDS shards.
# PAM logins (running the server by hand, load generators). The systemd unit
# sets its own LimitNOFILE and LimitMEMLOCK; systemd ignores this file.
# nofile = fd_target = N + N/10 + 65536.
$SERVICE_USER soft nofile $FD_TARGET
$SERVICE_USER hard nofile $FD_TARGET
# memlock = 64 MiB per shard (io_uring rings and provided-buffer rings), in KiB.
$SERVICE_USER soft memlock $memlock_kib
$SERVICE_USER hard memlock $memlock_kib
EOF
}

sysctl_content() {
    local key kind current target reason
    printf '# Generated by kernel-tuning/tune.sh for %s connections, %s bytes per connection.\n' \
        "$CONNECTIONS" "$BYTES_PER_CONN"
    printf '# See kernel-tuning/sysctl.d/%s for the reasoning behind each setting.\n' "$DROPIN_NAME"
    printf '# A leading "-" lets systemd-sysctl skip a key this kernel does not have.\n'
    while IFS='|' read -r key kind current target reason; do
        printf '\n# %s\n' "$reason"
        if [[ "$kind" == opt-min || -z "$current" ]]; then
            printf -- '-%s = %s\n' "$key" "$target"
        else
            printf '%s = %s\n' "$key" "$target"
        fi
    done < <(each_setting)
}

# --- modes ------------------------------------------------------------------------
do_plan() {
    local key kind current target reason status changes=0
    printf 'Plan for %s connections, %s bytes/connection, %s shards (root %s)\n\n' \
        "$CONNECTIONS" "$BYTES_PER_CONN" "$SHARDS" "${ROOT:-/}"
    printf '%-38s %-26s %-26s %-7s %s\n' SETTING CURRENT RECOMMENDED STATUS REASON
    while IFS='|' read -r key kind current target reason; do
        if [[ -z "$current" ]]; then
            status=absent
        elif [[ "$current" == "$target" ]]; then
            status=ok
        else
            status=change
            changes=$((changes + 1))
        fi
        printf '%-38s %-26s %-26s %-7s %s\n' "$key" "${current:-(absent)}" "$target" "$status" "$reason"
    done < <(each_setting)
    printf '\nLimits for user %s: nofile %s, memlock %s KiB (%s)\n' \
        "$SERVICE_USER" "$FD_TARGET" "$((SHARDS * 65536))" "${ETC_LIMITS#"$ROOT"}"
    printf '%s setting(s) would change. Run: tune.sh apply --connections %s --bytes-per-conn %s --yes\n' \
        "$changes" "$CONNECTIONS" "$BYTES_PER_CONN"
}

# Saves the files and live values apply replaces, once: a second apply keeps the
# first backup, so revert always returns to the state before tuning.
make_backup() {
    if [[ -f "$BACKUP_DIR/complete" ]]; then
        printf 'backup: kept existing %s\n' "${BACKUP_DIR#"$ROOT"}"
        return
    fi
    mkdir -p "$BACKUP_DIR"
    local key kind current target reason file name
    : >"$BACKUP_DIR/sysctl.before"
    while IFS='|' read -r key kind current target reason; do
        [[ -n "$current" ]] && printf '%s=%s\n' "$key" "$current" >>"$BACKUP_DIR/sysctl.before"
    done < <(each_setting)
    for file in "$ETC_SYSCTL" "$ETC_LIMITS"; do
        name="$(basename "$(dirname "$file")").$(basename "$file")"
        if [[ -f "$file" ]]; then
            cp -p -- "$file" "$BACKUP_DIR/$name.orig"
        else
            : >"$BACKUP_DIR/$name.absent"
        fi
    done
    : >"$BACKUP_DIR/complete"
    printf 'backup: saved live values and replaced files to %s\n' "${BACKUP_DIR#"$ROOT"}"
}

# Writes $2 into file $1 unless it already holds exactly that.
install_file() {
    local file="$1" content="$2"
    if [[ -f "$file" ]] && [[ "$(cat -- "$file")" == "$content" ]]; then
        printf 'file %s: unchanged\n' "${file#"$ROOT"}"
        return
    fi
    if ((YES)); then
        mkdir -p "$(dirname "$file")"
        printf '%s\n' "$content" >"$file.tmp"
        mv -- "$file.tmp" "$file"
        printf 'file %s: written\n' "${file#"$ROOT"}"
    else
        printf 'file %s: would write\n' "${file#"$ROOT"}"
    fi
}

do_apply() {
    if [[ -z "$ROOT" ]] && ((YES)) && ((EUID != 0)); then
        die "apply on the real system needs root"
    fi
    ((YES)) || printf 'Dry run: nothing changes without --yes.\n'
    if ((YES)); then make_backup; fi
    local key kind current target reason path
    while IFS='|' read -r key kind current target reason; do
        if [[ -z "$current" ]]; then
            printf '%s: absent on this kernel, skipped\n' "$key"
        elif [[ "$current" == "$target" ]]; then
            printf '%s: %s (ok)\n' "$key" "$current"
        elif ((YES)); then
            path="$(sysctl_path "$key")"
            printf '%s\n' "$target" >"$path"
            printf '%s: %s -> %s\n' "$key" "$current" "$target"
        else
            printf '%s: %s -> %s (would set)\n' "$key" "$current" "$target"
        fi
    done < <(each_setting)
    install_file "$ETC_SYSCTL" "$(sysctl_content)"
    install_file "$ETC_LIMITS" "$(limits_content)"
}

do_check() {
    local key kind current target reason shortfalls=0 value
    while IFS='|' read -r key kind current target reason; do
        if [[ -z "$current" ]]; then
            printf 'skip  %s: absent on this kernel\n' "$key"
        elif [[ "$current" == "$target" ]]; then
            printf 'ok    %s = %s\n' "$key" "$current"
        elif [[ "$kind" == advice ]]; then
            printf 'note  %s = %s (recommended %s: %s)\n' "$key" "$current" "$target" "$reason"
        else
            printf 'FAIL  %s = %s, needs %s: %s\n' "$key" "$current" "$target" "$reason"
            shortfalls=$((shortfalls + 1))
        fi
    done < <(each_setting)
    if [[ -f "$ETC_LIMITS" ]]; then
        value="$(awk -v u="$SERVICE_USER" '$1 == u && $2 == "hard" && $3 == "nofile" { print $4 }' "$ETC_LIMITS")"
        if is_uint "${value:-}" && ((value >= FD_TARGET)); then
            printf 'ok    limits nofile for %s = %s\n' "$SERVICE_USER" "$value"
        else
            printf 'FAIL  limits nofile for %s = %s, needs %s (%s)\n' \
                "$SERVICE_USER" "${value:-unset}" "$FD_TARGET" "${ETC_LIMITS#"$ROOT"}"
            shortfalls=$((shortfalls + 1))
        fi
    else
        printf 'FAIL  %s missing: no nofile limit of %s for %s\n' \
            "${ETC_LIMITS#"$ROOT"}" "$FD_TARGET" "$SERVICE_USER"
        shortfalls=$((shortfalls + 1))
    fi
    if ((shortfalls > 0)); then
        printf '%s shortfall(s). Fix: tune.sh apply --connections %s --bytes-per-conn %s --yes\n' \
            "$shortfalls" "$CONNECTIONS" "$BYTES_PER_CONN"
        exit 1
    fi
    printf 'all settings meet the target of %s connections\n' "$CONNECTIONS"
}

do_revert() {
    [[ -f "$BACKUP_DIR/complete" ]] || die "no backup at ${BACKUP_DIR#"$ROOT"}: nothing to revert"
    if [[ -z "$ROOT" ]] && ((YES)) && ((EUID != 0)); then
        die "revert on the real system needs root"
    fi
    ((YES)) || printf 'Dry run: nothing changes without --yes.\n'
    local key value path current file name
    while IFS='=' read -r key value; do
        [[ -n "$key" ]] || continue
        path="$(sysctl_path "$key")"
        current="$(read_sysctl "$key")"
        if [[ ! -e "$path" ]]; then
            printf '%s: absent now, skipped\n' "$key"
        elif [[ "$current" == "$value" ]]; then
            printf '%s: %s (unchanged)\n' "$key" "$current"
        elif ((YES)); then
            printf '%s\n' "$value" >"$path"
            printf '%s: %s -> %s\n' "$key" "$current" "$value"
        else
            printf '%s: %s -> %s (would restore)\n' "$key" "$current" "$value"
        fi
    done <"$BACKUP_DIR/sysctl.before"
    for file in "$ETC_SYSCTL" "$ETC_LIMITS"; do
        name="$(basename "$(dirname "$file")").$(basename "$file")"
        if [[ -f "$BACKUP_DIR/$name.orig" ]]; then
            if ((YES)); then cp -p -- "$BACKUP_DIR/$name.orig" "$file"; fi
            printf 'file %s: %s\n' "${file#"$ROOT"}" "$( ((YES)) && echo restored || echo 'would restore')"
        elif [[ -f "$file" ]]; then
            if ((YES)); then rm -f -- "$file"; fi
            printf 'file %s: %s\n' "${file#"$ROOT"}" "$( ((YES)) && echo removed || echo 'would remove')"
        fi
    done
    if ((YES)); then
        rm -rf -- "$BACKUP_DIR"
        printf 'backup %s: consumed\n' "${BACKUP_DIR#"$ROOT"}"
    fi
}

case "$MODE" in
    plan) build_settings; do_plan ;;
    apply) build_settings; do_apply ;;
    check) build_settings; do_check ;;
    revert) do_revert ;;
esac
