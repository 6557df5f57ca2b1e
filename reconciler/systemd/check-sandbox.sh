#!/bin/sh
# Checks that `berth serve` (and the berth-vmm processes it starts) does its job under
# the restrictions of berth.service, as far as they can be reproduced without systemd
# as PID 1 (this is how it was checked; see the README, "The systemd unit"):
#
# - the capability bounding set (CAP_SYS_NICE CAP_IPC_LOCK), NoNewPrivileges= and
#   UMask=0077 are applied for real (setpriv, umask) to a berth serve that starts a
#   heartbeat guest on hugepages (the pool reserved through /proc/sys/vm), re-pins it
#   live, resizes it (a local live migration), and is stopped with the guest running;
# - every system call berth and berth-vmm made (strace -f) is checked against the
#   unit's SystemCallFilter= (expanded by systemd-analyze), and the trace against
#   MemoryDenyWriteExecute=, RestrictAddressFamilies=, RestrictNamespaces= and
#   DeviceAllow=.
#
# Not reproduced: the mount namespace (ProtectSystem=strict, ReadWritePaths=,
# ProtectKernelTunables=, ProtectHome=, PrivateTmp=, ProtectProc=), the device cgroup
# and the seccomp filter itself; the trace shows which paths were written and which
# devices opened, to compare with them.
#
# Usage (root, /dev/kvm): reconciler/systemd/check-sandbox.sh [TARGET_DIR]
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$root/target/debug}" && pwd)
unit=$root/reconciler/systemd/berth.service
mkdir -p "$root/target"
work=$(mktemp -d "$root/target/sandbox-check.XXXXXX")
port=$((20000 + $$ % 20000))
guest=sandbox-$$
serve_pid=
pool_before=$(cat /proc/sys/vm/nr_hugepages)
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
    "$bin/berth" stop --all --state-dir "$work/state" --host kvm01 >/dev/null 2>&1 || true
    sleep 1
    # The pool as it was, if this check grew it.
    [ "$(cat /proc/sys/vm/nr_hugepages)" -gt "$pool_before" ] &&
        echo "$pool_before" > /proc/sys/vm/nr_hugepages || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

mkdir -p "$work/repo" "$work/state"
# The pool berth keeps: what is reserved already (at least 48 pages, for the guest
# and its resized copy during the local migration), so that other users of this
# machine keep theirs.
pool=$(cat /proc/sys/vm/nr_hugepages)
[ "$pool" -ge 48 ] || pool=48
cd "$work/repo"
git init -q --initial-branch=main
git config user.email sandbox@berth.invalid
git config user.name sandbox
hosts="apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm01}
spec: {address: '127.0.0.1:$port', cpus: 0-1, memory: 8GiB, hugepages: {2MiB: $pool}}
---"
guest_yaml() { # CPU, memory size
    printf '%s\napiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: %s}\nspec:\n  host: kvm01\n  cpu: {vcpus: 1, pinning: {vcpus: {0: "%s"}}}\n  memory: {size: %s, hugepages: {pageSize: 2MiB}}\n  boot: {kernel: builtin:heartbeat, heartbeat: {tickHz: 100, ticksPerLine: 10}}\n' \
        "$hosts" "$guest" "$1" "$2" > fleet.yaml
    git add fleet.yaml && git commit -qm "$guest cpu $1 memory $2" && git rev-parse HEAD
}
first=$(guest_yaml 0 32MiB)
"$bin/berth" certs --out "$work/tls" --host kvm01=127.0.0.1 >/dev/null
printf 'webhook-secret\n' > "$work/webhook-secret"

# The unit's capability bounding set, NoNewPrivileges= and UMask=, for real.
setpriv --no-new-privs --bounding-set -all,+sys_nice,+ipc_lock --inh-caps -all \
    sh -c "umask 0077; exec strace -f -qq -o '$work/trace' \
        '$bin/berth' serve --driver local --host kvm01 --repo '$work/repo' \
        --state-dir '$work/state' --listen 127.0.0.1:$port --poll-interval 1s \
        --tls-ca '$work/tls/ca.pem' --tls-cert '$work/tls/kvm01.pem' \
        --tls-key '$work/tls/kvm01.key' --webhook-secret-file '$work/webhook-secret'" \
    2> "$work/serve.log" &
serve_pid=$!

status() {
    "$bin/berth" status --json --server "https://127.0.0.1:$port" --tls-ca "$work/tls/ca.pem" 2>/dev/null
}
wait_applied() { # revision, what
    for _ in $(seq 300); do
        if status | grep -q "\"revision\": \"$1\""; then
            if status | tr -d ' \n' | grep -q "\"lastApplied\":{\"revision\":\"$1\""; then
                echo "ok: $2"; return 0
            fi
        fi
        sleep 0.2
    done
    echo "FAILED: $2"; status || true; tail -30 "$work/serve.log"; exit 1
}
vcpu_affinity() {
    pid=$(pgrep -f "berth-vmm.*$work/state/guests/$guest/" | head -1)
    for t in /proc/"$pid"/task/*; do
        if [ "$(cat "$t/comm")" = vcpu0 ]; then
            grep Cpus_allowed_list "$t/status" | awk '{print $2}'
        fi
    done
}

wait_applied "$first" "the guest started on hugepages under the sandbox"
echo "   vCPU 0 on CPU $(vcpu_affinity); hugepages in the pool: $(cat /proc/sys/vm/nr_hugepages)"
second=$(guest_yaml 1 32MiB)
wait_applied "$second" "re-pinned live"
[ "$(vcpu_affinity)" = 1 ] || { echo "FAILED: vCPU 0 on $(vcpu_affinity), not 1"; exit 1; }
echo "   vCPU 0 on CPU $(vcpu_affinity)"
third=$(guest_yaml 1 64MiB)
wait_applied "$third" "resized by a local live migration"
stat -c '   state files: %a %n' "$work/state"/guests/"$guest"/* | head -4

# SIGTERM to berth serve itself (strace's child), as systemd's KillMode=process does.
kill -TERM "$(pgrep -P "$serve_pid" -x berth)"
for _ in $(seq 100); do
    grep -q '"stopped"\|stopped$' "$work/serve.log" && break
    sleep 0.1
done
if pgrep -f "berth-vmm.*$work/state/guests/$guest/" >/dev/null; then
    echo "ok: the guest runs on after SIGTERM"
else
    echo "FAILED: the guest did not outlive the service"; exit 1
fi
"$bin/berth" stop --all --state-dir "$work/state" --host kvm01 >/dev/null
wait "$serve_pid" 2>/dev/null || true
serve_pid=

# The system calls made, against the unit's filter (groups expanded recursively).
expand() { # group or system call names
    for name in "$@"; do
        case "$name" in
        @*) expand $(systemd-analyze syscall-filter "$name" |
                sed -n 's/^ *\([@a-z_0-9-]*\)$/\1/p' | grep -vx -- "$name") ;;
        *) echo "$name" ;;
        esac
    done
}
allowed=$(mktemp)
expand $(sed -n 's/^SystemCallFilter=\([^~].*\)/\1/p' "$unit") | sort -u > "$allowed.allow"
expand $(sed -n 's/^SystemCallFilter=~\(.*\)/\1/p' "$unit") | sort -u > "$allowed.deny"
comm -23 "$allowed.allow" "$allowed.deny" > "$allowed"
sed -n 's/^[0-9]* *\([a-z_0-9]*\)(.*/\1/p' "$work/trace" | sort -u > "$work/used"
echo "system calls used: $(wc -l < "$work/used"), allowed by the unit: $(wc -l < "$allowed")"
echo "   $(tr "\n" " " < "$work/used")"
outside=$(comm -23 "$work/used" "$allowed" | tr '\n' ' ')
rm -f "$allowed" "$allowed.allow" "$allowed.deny"
[ -z "$outside" ] && echo "ok: every system call is allowed by SystemCallFilter=" \
    || { echo "FAILED: outside SystemCallFilter=: $outside"; exit 1; }

wx=$(grep -E 'mmap|mprotect' "$work/trace" | grep 'PROT_WRITE' | grep -c 'PROT_EXEC' || true)
[ "$wx" = 0 ] && echo "ok: no writable and executable mapping (MemoryDenyWriteExecute=)" \
    || { echo "FAILED: $wx W+X mappings"; exit 1; }
families=$(sed -n 's/.* socket(\(AF_[A-Z0-9]*\),.*/\1/p' "$work/trace" | sort -u | tr '\n' ' ')
echo "socket families: $families"
case " $families" in *AF_NETLINK*|*AF_PACKET*) echo "FAILED: outside RestrictAddressFamilies="; exit 1;; esac
grep -E 'unshare\(|setns\(|CLONE_NEW' "$work/trace" && { echo "FAILED: namespaces (RestrictNamespaces=)"; exit 1; }
echo "ok: no namespace made or joined (RestrictNamespaces=)"
devices=$(sed -n 's/.*open[a-z]*(.*"\(\/dev\/[^"]*\)".*= [0-9].*/\1/p' "$work/trace" | sort -u | tr '\n' ' ')
echo "devices opened: $devices"
writes=$(grep -E 'open[a-z]*\(.*O_(WRONLY|RDWR).* = [0-9]' "$work/trace" |
    sed -n 's/.*"\(\/[^"]*\)".*/\1/p' | grep -v "^$work\|^/dev/\(kvm\|null\)$" |
    sed 's|/[^/]*$||' | sort -u | tr '\n' ' ')
echo "directories written outside the work directory: $writes"
echo "all checks passed"
