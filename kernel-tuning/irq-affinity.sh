#!/usr/bin/env bash
# Aligns NIC interrupts, RPS and XPS with the CPUs Switchboard's shards run on.
#
#   irq-affinity.sh [--cpus LIST] [--interface IF]... [--root DIR] [--yes]
#
# Why: each shard is one thread pinned to one CPU. A packet whose interrupt and softirq
# run on another CPU costs a cross-CPU wake-up and cache misses for every message. This
# script spreads each NIC queue's interrupt over the shard CPUs (queue k -> CPU k mod n),
# maps transmit queues to the CPUs that send on them (XPS), and, when the NIC has fewer
# receive queues than shards, spreads receive processing in software (RPS + RFS) so no
# single CPU handles every packet.
#
# Dry run by default: prints each old -> new value and changes nothing without --yes.
# Every path is relative to --root DIR, else $SWITCHBOARD_SYSROOT, else /.
# Stop irqbalance first (systemctl disable --now irqbalance), or it undoes this.
set -euo pipefail

readonly FLOW_ENTRIES=32768

die() {
    printf 'irq-affinity.sh: %s\n' "$*" >&2
    exit 2
}

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --cpus LIST       shard CPUs, e.g. 0-7 or 0,2,4 (default: all online CPUs)
  --interface IF    a NIC to tune; repeat for several (default: every NIC except lo)
  --root DIR        system root (default $SWITCHBOARD_SYSROOT or /)
  --yes             write the values; otherwise only print them
  --help            this text
EOF
}

CPU_LIST=""
INTERFACES=()
ROOT="${SWITCHBOARD_SYSROOT:-/}"
YES=0

while (($# > 0)); do
    case "$1" in
        --cpus) CPU_LIST="${2:?--cpus needs a value}"; shift ;;
        --cpus=*) CPU_LIST="${1#*=}" ;;
        --interface) INTERFACES+=("${2:?--interface needs a value}"); shift ;;
        --interface=*) INTERFACES+=("${1#*=}") ;;
        --root) ROOT="${2:?--root needs a value}"; shift ;;
        --root=*) ROOT="${1#*=}" ;;
        --yes) YES=1 ;;
        --help | -h) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

[[ -d "$ROOT" ]] || die "root $ROOT is not a directory"
ROOT="${ROOT%/}"
if [[ -z "$ROOT" ]] && ((YES)) && ((EUID != 0)); then
    die "changing IRQ affinity on the real system needs root"
fi

# Expands "0-3,8" into "0 1 2 3 8".
expand_cpus() {
    local list="$1" part lo hi cpu
    local -a parts out=()
    IFS=, read -r -a parts <<<"$list"
    for part in "${parts[@]}"; do
        [[ "$part" =~ ^[0-9]+(-[0-9]+)?$ ]] || die "bad CPU list: $list"
        lo="${part%-*}"
        hi="${part#*-}"
        for ((cpu = lo; cpu <= hi; cpu++)); do out+=("$cpu"); done
    done
    echo "${out[*]}"
}

# Hex CPU mask in the kernel's format: 32-bit words, most significant first, commas.
cpu_mask() {
    local cpu max=0 words i text=""
    for cpu in "$@"; do ((cpu > max)) && max=$cpu; done
    words=$((max / 32 + 1))
    local -a word
    for ((i = 0; i < words; i++)); do word[i]=0; done
    for cpu in "$@"; do
        word[cpu / 32]=$((word[cpu / 32] | (1 << (cpu % 32))))
    done
    for ((i = words - 1; i >= 0; i--)); do
        if [[ -z "$text" ]]; then
            text="$(printf '%x' "${word[i]}")"
        else
            text="$text,$(printf '%08x' "${word[i]}")"
        fi
    done
    echo "$text"
}

# A mask without commas or leading zeros, for comparing what the kernel prints back.
normal_mask() {
    local mask="${1//,/}"
    mask="${mask#"${mask%%[!0]*}"}"
    echo "${mask:-0}"
}

CHANGES=0
# set_value FILE NEW [mask]: prints old -> new and writes it with --yes.
set_value() {
    local file="$1" new="$2" kind="${3:-plain}" old same=0
    if [[ ! -e "$file" ]]; then
        printf '%s: absent, skipped\n' "${file#"$ROOT"}"
        return
    fi
    old="$(tr -d '[:space:]' <"$file")"
    if [[ "$kind" == mask ]]; then
        [[ "$(normal_mask "$old")" == "$(normal_mask "$new")" ]] && same=1
    else
        [[ "$old" == "$new" ]] && same=1
    fi
    if ((same)); then
        printf '%s: %s (ok)\n' "${file#"$ROOT"}" "$old"
    elif ((YES)); then
        printf '%s\n' "$new" >"$file"
        printf '%s: %s -> %s\n' "${file#"$ROOT"}" "$old" "$new"
        CHANGES=$((CHANGES + 1))
    else
        printf '%s: %s -> %s (would set)\n' "${file#"$ROOT"}" "$old" "$new"
        CHANGES=$((CHANGES + 1))
    fi
}

if [[ -z "$CPU_LIST" ]]; then
    [[ -r "$ROOT/sys/devices/system/cpu/online" ]] || die "cannot read online CPUs; pass --cpus"
    CPU_LIST="$(tr -d '[:space:]' <"$ROOT/sys/devices/system/cpu/online")"
fi
read -r -a CPUS <<<"$(expand_cpus "$CPU_LIST")"
((${#CPUS[@]} > 0)) || die "no CPUs in $CPU_LIST"

if ((${#INTERFACES[@]} == 0)); then
    for dev in "$ROOT"/sys/class/net/*; do
        [[ -e "$dev" ]] || continue
        name="$(basename "$dev")"
        # Only physical NICs have a device link; skip loopback and virtual devices.
        [[ "$name" != lo && -e "$dev/device" ]] && INTERFACES+=("$name")
    done
fi
((${#INTERFACES[@]} > 0)) || die "no NIC found under ${ROOT:-}/sys/class/net; pass --interface"

((YES)) || printf 'Dry run: nothing changes without --yes.\n'
printf 'Shard CPUs: %s (mask %s)\n' "${CPUS[*]}" "$(cpu_mask "${CPUS[@]}")"

USE_RFS=0
for nic in "${INTERFACES[@]}"; do
    base="$ROOT/sys/class/net/$nic"
    [[ -d "$base" ]] || die "no interface $nic under ${ROOT:-}/sys/class/net"
    printf '\n== %s ==\n' "$nic"

    # Interrupts: one per queue vector, spread round-robin over the shard CPUs.
    irqs=()
    if [[ -d "$base/device/msi_irqs" ]]; then
        for entry in "$base"/device/msi_irqs/*; do
            [[ -e "$entry" ]] && irqs+=("$(basename "$entry")")
        done
        # Queue vectors are numbered in order; sort numerically, not as text.
        if ((${#irqs[@]} > 0)); then
            read -r -a irqs <<<"$(printf '%s\n' "${irqs[@]}" | sort -n | tr '\n' ' ')"
        fi
    fi
    if ((${#irqs[@]} == 0)); then
        printf 'no MSI interrupts listed for %s; interrupts left alone\n' "$nic"
    fi
    for i in "${!irqs[@]}"; do
        cpu="${CPUS[i % ${#CPUS[@]}]}"
        set_value "$ROOT/proc/irq/${irqs[i]}/smp_affinity_list" "$cpu"
    done

    rx_queues=()
    tx_queues=()
    for queue in "$base"/queues/rx-*; do [[ -e "$queue" ]] && rx_queues+=("$queue"); done
    for queue in "$base"/queues/tx-*; do [[ -e "$queue" ]] && tx_queues+=("$queue"); done

    # RPS: with a hardware queue per shard CPU the interrupts already spread the load,
    # so software steering only adds work; with fewer queues, spread in software.
    if ((${#rx_queues[@]} == 0 || ${#rx_queues[@]} >= ${#CPUS[@]})); then
        rps_mask=0
    else
        rps_mask="$(cpu_mask "${CPUS[@]}")"
        USE_RFS=1
    fi
    for queue in "${rx_queues[@]}"; do
        set_value "$queue/rps_cpus" "$rps_mask" mask
        if [[ "$rps_mask" != 0 ]]; then
            set_value "$queue/rps_flow_cnt" "$((FLOW_ENTRIES / ${#rx_queues[@]}))"
        fi
    done

    # XPS: transmit queue q serves the shard CPUs c_i with i mod (tx queues) == q, so a
    # shard always sends on the same queue and never contends for another's lock.
    for q in "${!tx_queues[@]}"; do
        members=()
        for i in "${!CPUS[@]}"; do
            ((i % ${#tx_queues[@]} == q)) && members+=("${CPUS[i]}")
        done
        if ((${#members[@]} > 0)); then
            set_value "${tx_queues[q]}/xps_cpus" "$(cpu_mask "${members[@]}")" mask
        fi
    done
done

# RFS steers each flow to the CPU of the thread reading it: the socket's home shard.
if ((USE_RFS)); then
    set_value "$ROOT/proc/sys/net/core/rps_sock_flow_entries" "$FLOW_ENTRIES"
fi

printf '\n%s value(s) %s.\n' "$CHANGES" "$( ((YES)) && echo changed || echo 'would change')"
