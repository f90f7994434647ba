# Helpers for lab scenarios (busybox sh, sourced before each scenario).
# A scenario prints what it does and ends with `fail "why"` (exit 1) on the first problem.
PF=0000:00:02.0
VF1=0000:00:02.1
VF2=0000:00:02.2
DD=/bin/driver-domain
SYS=/sys/bus/pci/devices

fail() { echo "FAIL: $*"; exit 1; }
step() { echo "--- [$(cut -d' ' -f1 /proc/uptime) s] $*"; }

# run CMD...: prints and runs CMD, fails the scenario unless it exits 0. Output in $OUT.
run() {
    echo "+ $*"
    OUT=$("$@" 2>&1)
    rc=$?
    [ -n "$OUT" ] && echo "$OUT"
    [ "$rc" = 0 ] || fail "'$*' exited $rc"
}

# expect_fail CODE TEXT CMD...: CMD must exit CODE and say TEXT (a fixed string).
expect_fail() {
    code=$1 text=$2
    shift 2
    echo "+ $*   (must exit $code saying '$text')"
    OUT=$("$@" 2>&1)
    rc=$?
    [ -n "$OUT" ] && echo "$OUT"
    [ "$rc" = "$code" ] || fail "'$*' exited $rc, expected $code"
    echo "$OUT" | grep -qF -- "$text" || fail "'$*' did not say '$text'"
    echo "$OUT" | grep -q panicked && fail "'$*' panicked"
    return 0
}

# says TEXT: the last command's output contains TEXT.
says() { echo "$OUT" | grep -qF -- "$1" || fail "output does not contain '$1'"; }

driver_of() { [ -e "$SYS/$1/driver" ] && basename "$(readlink "$SYS/$1/driver")" || echo none; }
group_of() { basename "$(readlink "$SYS/$1/iommu_group")"; }
numvfs() { cat "$SYS/$PF/sriov_numvfs"; }

# VFs of the NVMe PF up and online (driver-domain does the NVMe sequence), no driver on them.
# Always the whole sequence: VFs left by an earlier scenario may have offline secondaries.
vfs_up() {
    run $DD hw sriov $PF 2
    [ "$(numvfs)" = 2 ] || fail "sriov_numvfs is $(numvfs) after enabling 2 VFs"
}

vfs_down() {
    run $DD hw sriov $PF 0
    [ "$(numvfs)" = 0 ] || fail "sriov_numvfs is $(numvfs) after disabling VFs"
}

# bind_vf_nvme VF: binds the VF to the lab VM's nvme driver and waits for its namespace: NS.
bind_vf_nvme() {
    run $DD hw bind $1 nvme
    ctrl=$(ls $SYS/$1/nvme 2>/dev/null | head -1)
    [ -n "$ctrl" ] || fail "no nvme controller on $1 after binding nvme"
    i=0
    until [ -b /dev/${ctrl}n1 ]; do
        [ $i -ge 100 ] && fail "no /dev/${ctrl}n1 within 10 s"
        sleep 0.1; i=$((i + 1))
    done
    NS=/dev/${ctrl}n1
}
# stop_with_request_in_flight PID LOG: stops every thread of PID (SIGSTOP; a VMM: its vCPUs
# too) and looks at the in-flight log LOG (a frontend's: a 16-byte header, then 16 bytes per
# descriptor, the first 1 while the request is in flight) until it marks a request in flight,
# letting PID run a little between tries; PID is left stopped there. Sets CAUGHT and TRIES.
stop_with_request_in_flight() {
    CAUGHT=0
    TRIES=0
    while [ $TRIES -lt 200 ]; do
        TRIES=$((TRIES + 1))
        kill -STOP $1
        j=0
        while [ $j -lt 1000 ] && cat /proc/$1/task/*/stat 2>/dev/null |
            awk '{ sub(/.*\) /, ""); if ($1 != "T" && $1 != "t") running = 1 } END { exit !running }'; do
            j=$((j + 1))
        done
        CAUGHT=$(od -An -v -tu1 -j16 -N4096 $2 | awk '$1 == 1' | wc -l)
        [ "$CAUGHT" -gt 0 ] && return 0
        kill -CONT $1
        sleep 0.0$((TRIES % 7 + 1))
    done
    fail "no try of $TRIES found a request in flight"
}
# wait_gone PID SECONDS: waits for a background process; fails if it outlives SECONDS.
wait_gone() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
        [ $i -ge $(($2 * 10)) ] && return 1
        sleep 0.1
        i=$((i + 1))
    done
    return 0
}

# background PID: remembers a background process, which /init kills after the scenario.
background() { echo "$1" >> /tmp/lab-background.pids; }
# assert_confined PID: every domain process `splitvmm up` (PID) started runs as a uid of its
# own, without capabilities, with no_new_privs and a seccomp filter, in mount and pid
# namespaces that are not the toolstack's (docs/security.md); judged from /proc, outside.
# The driver domain's hardware helper (splitvmm-hw-helper, root by design) is not a domain:
# it is checked to hold CAP_SYS_ADMIN alone, no_new_privs and no descriptor but its stdin, its
# log and its channel.
assert_confined() {
    n=0
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        [ "$(cut -d' ' -f4 $d/stat 2>/dev/null)" = "$1" ] || continue
        grep -q '^State:.*Z' $d/status 2>/dev/null && continue
        name=$(cut -d' ' -f2 $d/stat)
        if [ "$name" = "(splitvmm-hw-hel)" ]; then
            nnp=$(awk '/^NoNewPrivs:/ { print $2 }' $d/status)
            cap=$(awk '/^CapEff:/ { print $2 }' $d/status)
            bnd=$(awk '/^CapBnd:/ { print $2 }' $d/status)
            fds=$(ls $d/fd | wc -l)
            echo "hardware helper pid $p: uid $(awk '/^Uid:/ { print $2 }' $d/status) CapEff $cap CapBnd $bnd NoNewPrivs $nnp, $fds descriptors"
            [ "$nnp" = 1 ] || fail "the hardware helper ($p) has no no_new_privs"
            [ "$cap $bnd" = "0000000000200000 0000000000200000" ] || fail "the hardware helper ($p) holds more than CAP_SYS_ADMIN"
            [ "$fds" = 4 ] || fail "the hardware helper ($p) holds $fds descriptors, not 4: $(ls -l $d/fd)"
            continue
        fi
        uid=$(awk '/^Uid:/ { print $2 }' $d/status)
        cap=$(awk '/^CapEff:/ { print $2 }' $d/status)
        nnp=$(awk '/^NoNewPrivs:/ { print $2 }' $d/status)
        sec=$(awk '/^Seccomp:/ { print $2 }' $d/status)
        echo "confined? $name pid $p: uid $uid CapEff $cap NoNewPrivs $nnp Seccomp $sec"
        [ "$uid" != 0 ] || fail "$name ($p) runs as root"
        [ "$cap" = 0000000000000000 ] || fail "$name ($p) has capabilities $cap"
        [ "$nnp" = 1 ] || fail "$name ($p) has no no_new_privs"
        [ "$sec" = 2 ] || fail "$name ($p) has no seccomp filter"
        # A console client or vhost-user peer gone mid-write must not end the domain.
        ign=$(awk '/^SigIgn:/ { print $2 }' $d/status)
        [ $((0x$ign & 0x1000)) != 0 ] || fail "$name ($p) does not ignore SIGPIPE (SigIgn $ign)"
        for ns in mnt pid; do
            [ "$(readlink $d/ns/$ns)" != "$(readlink /proc/$1/ns/$ns)" ] || fail "$name ($p) shares the toolstack's $ns namespace"
        done
        n=$((n + 1))
    done
    [ $n -gt 0 ] || fail "no domain process under pid $1"
}
