# driver-vm: the driver domain as a VM (issue 21, phase 1). A driver-domain VM (the lab's
# Debian kernel under splitvmm-vmm, 1 vCPU, 160 MiB) owns NVMe VF 1 by VFIO: its kernel's nvme
# driver binds the VF and its /init (tests/lab/driver-init) runs `driver-domain vm-serve
# --tunnel /dev/ttyS1 --blk /dev/nvme0n1`. Its VMM (`--driver-vm-socket`) relays a vhost-user
# socket to it over COM2 and maps the guest's memory into a BAR of the cross-VM device. A Linux
# guest (`--blk-socket` on that socket, all RAM shared) writes this run's pattern to its
# virtio-blk disk and runs an I/O phase and an idle baseline as long; around each the lab VM
# reads every host thread's run count of both VMMs from schedstat and prints what the threads
# other than the two VMs' vCPUs ran per request beyond their idle rate (timers): below 0.1.
# After both VMs are gone the lab VM reads the pattern back from the VF's namespace with its
# own nvme driver, with the last writes of the restart step: while the guest writes 256 KiB
# with O_DIRECT in a loop (l2.writer=1), the driver VM's VMM is killed (SIGKILL) and started
# again with the same arguments; the guest's VMM reconnects and resumes its disk in place with
# the in-flight log (kept in the guest's VMM, mapped into the new driver VM's BAR2); the writes
# go on, none fails. For comparison the same guest then runs on the process driver domain
# (`driver-domain serve` on that namespace in the lab VM): time and host thread runs per request.
# Before the Linux guest, the isolation step (isolation_probe below): tiny-kernel guests served
# on channel 1 (a RAM disk in the driver VM) and the driver VM's probe scanning BAR2 for them.
W=/tmp/driver-vm
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
[ -f /lab/driver/initrd.gz ] || fail "the driver VM's initramfs was not packed"
VMM=/bin/splitvmm-vmm
[ -x $VMM ] || fail "no $VMM in the lab VM"
PATTERN=$LAB_PATTERN-DVM
REQUESTS=128
SOCK=$W/blk0.sock
DVM_CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS nvme_core.multipath=N nvme_core.io_timeout=10 nvme_core.admin_timeout=10 dvm.ramdisk=4096 dvm.serve_args=--blk,/dev/ram0"
# The isolation step's guests (channel 1), their window markers and secrets (this run's), and
# the probe runs of the first driver VM's /init (one per guest, in order).
ISO_SOCK=$W/blk1.sock
rand_hex() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
ISO_MARK=$(rand_hex) ISO_SECRET=$(rand_hex) CTL_MARK=$(rand_hex) CTL_SECRET=$(rand_hex)
DVM_PROBE="dvm.probe=--find,$ISO_MARK,--absent,$ISO_SECRET/--find,$CTL_MARK,--absent,$CTL_SECRET"
GUEST_CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS l2.dvm_requests=$REQUESTS"

# thread_runs PID: one line per thread of PID: tid, name, times scheduled in (schedstat).
thread_runs() {
    for t in /proc/$1/task/*; do
        echo "${t##*/} $(cat $t/comm) $(cut -d' ' -f3 $t/schedstat 2>/dev/null)"
    done
}
# snap NAME: every thread's run count of the guest's VMM and of the backend ($backend: the
# driver VM's VMM, or the process driver domain) now, and the time.
snap() {
    cut -d' ' -f1 /proc/uptime > $W/t.$1
    thread_runs $backend > $W/backend.$1
    thread_runs $guest > $W/guest.$1
}
# runs_between A B LABEL: each thread's runs between snapshots A and B of LABEL (backend or
# guest); sets NONVCPU to the runs of threads not named vcpu<N> and SECS to the window's length.
runs_between() {
    SECS=$(awk -v a="$(cat $W/t.$1)" -v b="$(cat $W/t.$2)" 'BEGIN { printf "%.2f", b - a }')
    awk -v label="$3 $1-$2 (${SECS} s)" '
        FNR == NR { before[$1] = $3; next }
        { d = $3 - ($1 in before ? before[$1] : 0)
          printf "%s thread %s %-16s runs %6d\n", label, $1, $2, d
          if ($2 !~ /^vcpu[0-9]+$/) other += d }
        END { printf "%s non-vCPU runs %d\n", label, other }' "$W/$3.$1" "$W/$3.$2" > $W/runs
    cat $W/runs
    NONVCPU=$(sed -n 's/.* non-vCPU runs \([0-9]*\)$/\1/p' $W/runs)
}
# round_net COUNTER: the net (I/O phase minus its idle baseline) of COUNTER in the guest VMM's
# table of the measured round.
round_net() {
    awk -v c="$1" '$1 == "round" && $2 == 1 && $3 == c { print $6 }' $W/guest.vmm
}

# read_ns_block BLOCK LEN: LEN bytes of 4 KiB block BLOCK of $NS.
read_ns_block() {
    GOT=$(dd if=$NS bs=4096 skip=$1 count=1 iflag=direct 2>/dev/null | head -c $2)
}
# start_dvm TAG: boots the driver VM (console $W/TAG.console, VMM log $W/TAG.vmm); $dvm is its VMM.
start_dvm() {
    echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/driver/initrd.gz --vcpus 1 --mem-mib 160 --vfio $VF1 $relay --count-vmm-threads --cmdline '$DVM_CMDLINE'"
    RUST_LOG=info timeout 300 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/driver/initrd.gz \
        --vcpus 1 --mem-mib 160 --vfio $VF1 $relay --count-vmm-threads \
        --cmdline "$DVM_CMDLINE${DVM_PROBE:+ $DVM_PROBE}" > $W/$1.console 2> $W/$1.vmm &
    dvm=$!
    background $dvm
}
# last_written FILE: the writer's last reported write in the guest's console FILE.
last_written() {
    sed -n 's/^L2-WRITER at \([0-9]*\) .*/\1/p' $1 | tail -1
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# wait_line FILE PATTERN SECONDS PID: waits for PATTERN in FILE while PID lives.
wait_line() {
    i=0
    until grep -q "$2" $1 2>/dev/null; do
        kill -0 $4 2>/dev/null || return 1
        [ $i -ge $(($3 * 10)) ] && return 1
        sleep 0.1
        i=$((i + 1))
    done
}

step "VFs up, VF1 on vfio-pci"
[ "$(numvfs)" = 0 ] || vfs_down
vfs_up
run $DD hw bind $VF1 vfio-pci
[ -c /dev/vfio/$(group_of $VF1) ] || fail "no /dev/vfio/$(group_of $VF1)"

step "boot the driver-domain VM with VF1 assigned (1 vCPU, 160 MiB), serving $SOCK"
relay=
$VMM --help 2>&1 | grep -q -- --driver-vm-socket && relay="--driver-vm-socket $SOCK --driver-vm-socket $ISO_SOCK --driver-vm-shm-mib 256"
start_dvm dvm
ok=1
wait_line $W/dvm.console "^DVM-SERVE starting" 120 $dvm || ok=0
# vm-serve has opened the tunnel and the cross-VM device once it says HELLO.
[ $ok = 1 ] && { wait_line $W/dvm.console "vm-serve: ready" 30 $dvm || ok=0; }
grep -E "Linux version|^DVM-|nvme|vm-serve|cross-VM|^Error|Caused by|^ +[0-9]+: |Kernel panic|BUG|WARNING" $W/dvm.console | head -30
echo "--- driver VM's VMM log:"
grep -vE "unknown port|unbacked GPA" $W/dvm.vmm | tail -15
grep -q "Linux version" $W/dvm.console || fail "no 'Linux version' on the driver VM's console"
grep -q "MSI-X enabled" $W/dvm.vmm || fail "the driver VM's kernel never enabled the VF's MSI-X"
grep -qE "^DVM-NVME /dev/nvme0n1 [0-9]+ sectors driver nvme" $W/dvm.console ||
    fail "the driver VM's nvme driver did not bind the VF (no /dev/nvme0n1)"
grep -q "^DVM-SERVE starting" $W/dvm.console || fail "the driver VM's /init did not start vm-serve"
[ -n "$relay" ] || fail "splitvmm-vmm has no --driver-vm-socket (the dom0 side, branch dvm-host, is not merged): the driver VM booted with the VF and vm-serve started, nothing to serve"
[ $ok = 1 ] || fail "vm-serve did not get ready (tunnel, cross-VM device)"
[ -S $SOCK ] || fail "the driver VM's VMM does not listen on $SOCK"

# isolation_probe (issue 21, "Security and failure"): a tiny-kernel guest that shares only its
# I/O window (1 MiB; its 8 MiB of RAM stay private) keeps a secret in RAM outside the window
# (--private-marker, written by its VMM at 4 MiB) and a marker in the window's last page
# (--window-marker); its disk is served by the driver VM on channel 1 (a RAM disk there). In
# the driver VM the probe (driver-domain vm-probe, started by its /init) waits for the window
# marker in BAR2, scans every byte dom0 maps there for the secret, samples the unmapped rest,
# tries to map past BAR2's end and to read its own RAM through /dev/mem. The guest is stopped
# (SIGSTOP) when the probe says it has seen the marker, so that it stays connected, its memory
# mapped, until the probe has reported; then it goes on and its disk check must pass. Then the control: the same guest with --share-all-ram, whose secret
# the probe must find (the scan can see a guest's RAM when dom0 maps it).
isolation_probe() {
    step "isolation: a tiny-kernel guest sharing only its I/O window, served on channel 1; the driver VM's probe looks for its secret"
    grep "^DVM-RAMDISK" $W/dvm.console || fail "the driver VM has no RAM disk for channel 1"
    [ -S $ISO_SOCK ] || fail "the driver VM's VMM does not listen on $ISO_SOCK (channel 1)"
    t_iso=$(uptime_s)
    # run_tiny TAG MARK SECRET N [ARGS]: the tiny guest's disk check (100 requests) on channel 1;
    # stops the guest when the probe has seen its marker (DVM-PROBE window-marker seen, the
    # Nth), waits for the probe's report (DVM-PROBE exited, the Nth), lets the guest go on and
    # waits for its end (status 0: its disk check through the driver VM passed).
    run_tiny() {
        tag=$1 mark=$2 secret=$3 nth=$4
        shift 4
        echo "+ $VMM --kernel /bin/tiny-kernel --mode disk --requests 100 --blk-socket $ISO_SOCK --window-marker $mark --private-marker $secret $*"
        RUST_LOG=info timeout 120 $VMM --kernel /bin/tiny-kernel --mode disk --requests 100 --blk-socket $ISO_SOCK \
            --window-marker $mark --private-marker $secret "$@" > $W/$tag.console 2> $W/$tag.vmm &
        tiny=$!
        t0=$(uptime_s)
        background $tiny
        i=0
        until [ "$(grep -c '^DVM-PROBE window-marker seen' $W/dvm.console)" -ge $nth ]; do
            kill -0 $tiny 2>/dev/null || { tail -5 $W/$tag.vmm; fail "the tiny guest ($tag) ended before the probe saw its window marker"; }
            [ $i -ge 600 ] && { tail -5 $W/$tag.vmm; fail "the probe did not see the window marker of $tag within 60 s"; }
            sleep 0.1; i=$((i + 1))
        done
        kill -STOP $tiny
        t_seen=$(uptime_s)
        i=0
        until [ "$(grep -c '^DVM-PROBE exited' $W/dvm.console)" -ge $nth ]; do
            kill -0 $dvm 2>/dev/null || fail "the driver VM ended during the isolation step"
            [ $i -ge 900 ] && { tail -5 $W/$tag.vmm; fail "no probe report $nth within 90 s"; }
            sleep 0.1; i=$((i + 1))
        done
        t_report=$(uptime_s)
        kill -CONT $tiny
        wait $tiny
        rc=$?
        echo "the guest was stopped $(awk -v a=$t0 -v b=$t_seen 'BEGIN { printf "%.1f", b - a }') s after it started (the probe had seen its marker), the probe reported $(awk -v a=$t0 -v b=$t_report 'BEGIN { printf "%.1f", b - a }') s after, the guest ended $(awk -v a=$t0 -v b=$(uptime_s) 'BEGIN { printf "%.1f", b - a }') s after"
        grep -E "^disk|per-request" $W/$tag.console | head -3
        [ $rc = 0 ] || { tail -5 $W/$tag.vmm; fail "the tiny guest ($tag) exited $rc: its disk check through the driver VM failed"; }
        # The probe's lines of this report: from the (N-1)th "exited" to the Nth.
        awk -v n=$nth '/^DVM-PROBE/ { if (k == n - 1) print } /^DVM-PROBE exited/ { k++ }' $W/dvm.console | tr -d '\r' > $W/$tag.probe
        cat $W/$tag.probe
    }
    run_tiny tiny $ISO_MARK $ISO_SECRET 1
    p=$W/tiny.probe
    grep -q "^DVM-PROBE window-marker found at " $p ||
        fail "the probe did not see the guest's window marker in BAR2: its scan is blind, it proves nothing"
    grep -q "^DVM-PROBE secret in-bar2 0 " $p || fail "the guest's private secret is in the driver VM's BAR2"
    grep -q "^DVM-PROBE unmapped-samples [0-9]* nonzero 0$" $p || fail "unmapped BAR2 did not read zero"
    grep -q "^DVM-PROBE past-bar2 mmap-at-end refused .* mmap-oversized refused " $p ||
        fail "the driver VM could map past BAR2's end"
    grep -q "^DVM-PROBE own-ram .* devmem-16MiB refused " $p || fail "the driver VM read its own RAM through /dev/mem"
    grep -q "^DVM-PROBE result isolated" $p && grep -q "^DVM-PROBE exited 0" $p || fail "the probe did not report isolation"
    backed=$(sed -n 's/^DVM-PROBE bar2 .* backed \([0-9]*\) bytes$/\1/p' $p)
    # All that dom0 maps for a window-only guest: its 1 MiB window and the in-flight log; its
    # 8 MiB of RAM cannot be in less.
    [ -n "$backed" ] && [ "$backed" -ge $((1 << 20)) ] && [ "$backed" -lt $((8 << 20)) ] ||
        fail "BAR2 backs ${backed:-?} bytes for a guest sharing its 1 MiB window only"

    step "isolation control: the same guest sharing all its RAM (--share-all-ram); the probe must find its secret"
    run_tiny control $CTL_MARK $CTL_SECRET 2 --share-all-ram
    p=$W/control.probe
    grep -q "^DVM-PROBE window-marker found at " $p || fail "the control probe did not see the window marker"
    grep -q "^DVM-PROBE secret in-bar2 [1-9]" $p ||
        fail "the probe did not find the secret of a guest that shares all its RAM: it could not have found a leak"
    grep -q "^DVM-PROBE exited 3" $p || fail "the control probe did not report the breach (exit 3)"
    echo "DVM-ISOLATION window-only guest: BAR2 backs $backed bytes of $(sed -n 's/^DVM-PROBE bar2 \([0-9]*\) bytes.*/\1/p' $W/tiny.probe), window marker found, secret in BAR2 0, past BAR2 and /dev/mem refused; all-RAM control: secret found ($(sed -n 's/^DVM-PROBE secret in-bar2 \([0-9]*\) .*/\1/p' $p)x); step $(awk -v a=$t_iso -v b=$(uptime_s) 'BEGIN { printf "%.1f", b - a }') s"
}
isolation_probe
# The restarted driver VM runs no probe.
DVM_PROBE=

# restart_driver_vm: while the guest's writer runs, kills the driver VM's VMM (SIGKILL), starts
# it again with the same arguments and waits for the guest's writes to go on; then presses the
# guest's power button (it stops its writer, reports and powers off).
restart_driver_vm() {
    step "kill -9 the driver VM's VMM while the guest writes; start it again with the same arguments"
    wait_line $W/guest.console "^L2-WRITER at " 60 $guest || fail "the guest's writer did not start"
    sleep 2
    # The in-flight log is the guest's VMM's to keep (the memfd the relay made): stop the driver
    # VM (SIGSTOP to its VMM: every thread, the vCPU with it) until the log marks a request in
    # flight, and kill it there.
    log_fd=$(ls -l /proc/$guest/fd | grep "splitvmm-blk-inflight" | sed 's/.* \([0-9]*\) -> .*/\1/' | head -1)
    [ -n "$log_fd" ] || { ls -l /proc/$guest/fd; fail "the guest's VMM holds no in-flight log"; }
    stop_with_request_in_flight $dvm /proc/$guest/fd/$log_fd
    caught=$CAUGHT tries=$TRIES
    at_kill=$(last_written $W/guest.console)
    t0=$(uptime_s)
    kill -9 $dvm
    wait_gone $dvm 10 || fail "the driver VM's VMM outlived SIGKILL"
    echo "killed the driver VM's VMM (pid $dvm) at $t0 s with $caught request(s) in flight (try $tries), the guest's writer at write $at_kill"
    start_dvm dvm2
    wait_line $W/dvm2.console "vm-serve: ready" 150 $dvm || {
        tail -20 $W/dvm2.console; tail -20 $W/dvm2.vmm
        fail "the restarted driver VM did not get ready"
    }
    t_ready=$(uptime_s)
    wait_line $W/guest.vmm "resumed on the restarted backend" 60 $guest || {
        grep -vE "unknown port|unbacked GPA" $W/guest.vmm | tail -20
        grep -E "vm-serve|channel|in-flight" $W/dvm2.console | tail -20
        fail "the guest's VMM did not resume its disk on the restarted driver VM"
    }
    t_resumed=$(uptime_s)
    grep "blk 0: " $W/guest.vmm | grep -vE "unknown port|unbacked GPA" | tail -4
    grep -q "resumed on the restarted backend (in-flight log handed back)" $W/guest.vmm ||
        fail "the guest's disk resumed without its in-flight log"
    grep -E "in-flight log|resubmit" $W/dvm2.console | tail -4
    grep -q "in-flight log taken over" $W/dvm2.console || fail "the new driver VM did not take the log over"
    # The writes go on: the writer reports 8 more than at the kill.
    i=0
    until [ "$(last_written $W/guest.console)" -ge $((at_kill + 8)) ] 2>/dev/null; do
        kill -0 $guest 2>/dev/null || fail "the guest ended while its writes should resume"
        [ $i -ge 600 ] && fail "the writer did not get 8 writes past write $at_kill within 60 s of the resume"
        sleep 0.1; i=$((i + 1))
    done
    t_writes=$(uptime_s)
    echo "DVM-RESTART driver VM ready after $(awk -v a=$t0 -v b=$t_ready 'BEGIN{printf "%.1f", b-a}') s, disk resumed after $(awk -v a=$t0 -v b=$t_resumed 'BEGIN{printf "%.1f", b-a}') s, writer 8 writes past the kill after $(awk -v a=$t0 -v b=$t_writes 'BEGIN{printf "%.1f", b-a}') s (write $(last_written $W/guest.console))"

    kill -USR1 $guest
}
# check_writer: after the guest powered off: its writer's verdict and kernel log (no failed
# write, no I/O error), and at least 8 writes acknowledged after the kill. Sets ACKED.
check_writer() {
    grep -E "^L2-WRITER acked|^L2-WRITE-FAILED|^L2-IOERR" $W/guest.console
    grep -q "^L2-WRITE-FAILED" $W/guest.console && fail "a write of the guest failed"
    grep -q "^L2-IOERR" $W/guest.console && fail "the guest's kernel logged an I/O error"
    ACKED=$(sed -n 's/^L2-WRITER acked \([0-9]*\).*/\1/p' $W/guest.console | tr -d '\r' | tail -1)
    [ -n "$ACKED" ] || fail "the guest's writer did not report"
    [ "$ACKED" -gt $((at_kill + 8)) ] || fail "the writer acknowledged $ACKED writes, at the kill $at_kill"
    echo "the guest's writer acknowledged $ACKED writes ($at_kill at the kill), none failed, no I/O error in its kernel log"
}

# run_guest SOCKET PATTERN COUNT-ARGS...: boots the Linux guest on the vhost-user SOCKET (1 vCPU,
# 160 MiB, all RAM shared; its VMM counts the backend's threads as COUNT-ARGS say); it writes
# PATTERN to sector 8 of its disk, then runs its I/O phase and its idle baseline, which its VMM
# measures at the phase marks; the lab VM also reads each thread's run count of the backend
# and of the guest's VMM around both (schedstat) to show which threads ran. Sets N
# (requests), MS (the phase's guest time).
run_guest() {
    sock=$1 pat=$2
    shift 2
    rm -f $W/guest.console $W/guest.vmm
    echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz --vcpus 1 --mem-mib 160 --blk-socket $sock --share-all-ram --count-vmm-threads $* --cmdline '$GUEST_CMDLINE l2.pattern=$pat${RESTART:+ $RESTART_ARGS}'"
    RUST_LOG=info timeout 300 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
        --vcpus 1 --mem-mib 160 --blk-socket $sock --share-all-ram --count-vmm-threads "$@" \
        --cmdline "$GUEST_CMDLINE l2.pattern=$pat${RESTART:+ $RESTART_ARGS}" > $W/guest.console 2> $W/guest.vmm &
    guest=$!
    background $guest
    wait_line $W/guest.console "^L2-DVM-IO-BEGIN" 150 $guest || {
        grep -E "Linux version|^L2-|virtio|vda|Kernel panic" $W/guest.console | tail -20
        tail -20 $W/guest.vmm
        fail "the guest did not reach its I/O phase"
    }
    snap io0
    wait_line $W/guest.console "^L2-DVM-IO-END" 120 $guest || fail "the guest's I/O phase did not end within 120 s"
    snap io1
    wait_line $W/guest.console "^L2-DVM-IDLE-BEGIN" 10 $guest || fail "the guest's idle baseline did not begin"
    snap idle0
    wait_line $W/guest.console "^L2-DVM-IDLE-END" 120 $guest || fail "the guest's idle baseline did not end"
    snap idle1
    [ -n "$RESTART" ] && restart_driver_vm
    wait $guest
    rc=$?
    grep -E "Linux version|^L2-|virtio_blk|vda|Kernel panic|BUG|WARNING" $W/guest.console | head -30
    echo "--- guest VMM log:"
    grep -vE "unknown port|unbacked GPA|^round" $W/guest.vmm | tail -8
    [ "$rc" = 0 ] || fail "the guest's splitvmm-vmm exited $rc (0 = it powered off)"
    grep -q "^L2-DISK-WRITTEN" $W/guest.console || fail "the guest did not write its pattern to /dev/vda"
    N=$(sed -n 's/^L2-DVM-IO-END requests \([0-9]*\).*/\1/p' $W/guest.console | tr -d '\r')
    MS=$(sed -n 's/^L2-DVM-IO-END requests [0-9]* ms \([0-9]*\).*/\1/p' $W/guest.console | tr -d '\r')
    echo "guest requests in the I/O phase: ${N:-none} in ${MS:-?} ms of guest time (QD1, 4 KiB, direct)"
    [ "${N:-0}" -ge $REQUESTS ] || fail "the guest made ${N:-0} requests, expected $REQUESTS"
    echo "--- the guest VMM's round (I/O phase, idle baseline as long, net):"
    grep -E "^round 1" $W/guest.vmm | grep -E "round 1:|host\.|kvm.exits "
    echo "--- each thread's runs around the I/O phase (io0-io1) and the idle baseline (idle0-idle1):"
    for label in guest backend; do
        runs_between io0 io1 $label
        runs_between idle0 idle1 $label
    done
}

step "boot the Linux guest whose disk the driver VM serves; host thread runs (schedstat) around its I/O"
backend=$dvm
RESTART=1
RESTART_ARGS="l2.writer=1 l2.writer_report=1 l2.button=1"
run_guest $SOCK $PATTERN --count-non-vcpu-threads-of $dvm
RESTART=
check_writer
echo "--- driver VM (vm-serve):"
grep -E "vm-serve|channel|poller" $W/dvm.console | tail -8
dvm_ms=$MS
own=$(round_net host.vmm_thread_runs)
peer=$(round_net host.peer_vmm_thread_runs)
dvm_exits=$(round_net kvm.exits)
per=$(awk -v a="$own" -v b="$peer" -v n=$N 'BEGIN { printf "%.2f", (a + b) / n }')
echo "DVM-THREAD-RUNS requests $N net of idle: guest VMM non-vCPU $own, driver VM's VMM non-vCPU $peer: $per per request"
[ -n "$own" ] && [ -n "$peer" ] || fail "the guest's VMM did not measure the round's thread runs"
# One run per request would be 1.00; the VMMs' main threads wake once a second either way.
awk -v e=$per 'BEGIN { exit !(e < 0.1) }' ||
    fail "host threads other than the two VMs' vCPUs ran $per times per request"

step "the driver VM is stopped; the pattern and the last writes are read back from the VF's namespace"
kill $dvm
wait_gone $dvm 20 || fail "the driver VM's VMM outlived its SIGTERM by 20 s"
grep -E "poller|vm-serve" $W/dvm2.console | tail -5
bind_vf_nvme $VF1
read_ns_block 1 ${#PATTERN}
echo "block 1 (sector 8) through $VF1: $GOT"
[ "$GOT" = "$PATTERN" ] || fail "the VF's namespace holds '$GOT' at sector 8, expected '$PATTERN'"
# The last 8 acknowledged writes (slot 32 + i % 96 of 256 KiB), all after the restart.
i=$((ACKED - 7))
while [ $i -le $ACKED ]; do
    want="$PATTERN-w$i"
    read_ns_block $(((32 + i % 96) * 64)) ${#want}
    [ "$GOT" = "$want" ] || fail "write $i is not on the namespace: '$GOT'"
    i=$((i + 1))
done
echo "writes $((ACKED - 7))..$ACKED (acknowledged last, after the restart) are on the namespace"

step "the same guest on the process driver domain (driver-domain serve on the namespace, in the lab VM), for comparison"
dev=/dev/${ctrl}n1
$DD serve --blk $dev --socket $W/process.sock > $W/dd.log 2>&1 &
backend=$!
background $backend
i=0
until [ -S $W/process.sock ]; do
    [ $i -ge 100 ] && fail "driver-domain serve did not listen within 10 s"
    sleep 0.1; i=$((i + 1))
done
run_guest $W/process.sock $PATTERN-P --count-threads-of $backend
own=$(round_net host.vmm_thread_runs)
proc_runs=$(round_net host.backend_thread_runs)
proc_exits=$(round_net kvm.exits)
echo "DVM-COMPARE per request (QD1, 4 KiB): guest time driver VM $(awk -v m=$dvm_ms -v n=$N 'BEGIN { printf "%.2f", m / n }') ms, process driver domain $(awk -v m=$MS -v n=$N 'BEGIN { printf "%.2f", m / n }') ms; the guest's KVM exits driver VM $(awk -v e=$dvm_exits -v n=$N 'BEGIN { printf "%.1f", e / n }'), process $(awk -v e=$proc_exits -v n=$N 'BEGIN { printf "%.1f", e / n }'); host threads beyond vCPUs driver VM $per, process driver domain $(awk -v a=$own -v b=$proc_runs -v n=$N 'BEGIN { printf "%.2f", (a + b) / n }') (its own threads $proc_runs)"
kill $backend
wait_gone $backend 10 || fail "driver-domain serve outlived its SIGTERM by 10 s"
GOT=$(dd if=$dev bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c $((${#PATTERN} + 2)))
[ "$GOT" = "$PATTERN-P" ] || fail "the namespace holds '$GOT' at sector 8 after the process-served guest, expected '$PATTERN-P'"

step "tear down"
vfs_down
left=$(ps -o pid,args | grep -E '[s]plitvmm-vmm')
[ -z "$left" ] || fail "processes left: $left"
echo "driver-vm: ok"
