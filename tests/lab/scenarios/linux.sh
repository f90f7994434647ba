# linux: an unmodified Debian cloud kernel (the lab's own bzImage) boots as an L2 guest of
# splitvmm-vmm with 2 vCPUs: hardware-reduced ACPI, the in-kernel irqchip, COM1, PCI, and a
# virtio-blk disk (virtio-pci, MSI-X; two request queues, as the backend serves two) served by
# the driver domain over vhost-user. The guest's
# /init reports its CPUs and interrupts, writes this run's pattern to the disk and waits for the
# ACPI power button, which the lab presses (SIGUSR1 to the VMM: GED interrupt, button.ko); the
# guest then powers off, its ACPI S5 write must end the VMM, and the lab VM checks the pattern
# in the image file. Before that the guest writes garbage to its PCI configuration space and
# virtio BAR (read-only and unimplemented registers, beyond the MSI-X table, a notify for no
# queue): all ignored, and a second pattern written afterwards must reach the image too.
W=/tmp/linux
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
VMM=/bin/splitvmm-vmm
PATTERN=$LAB_PATTERN-L2
# iomem=relaxed: the guest's bad-input step pokes its own virtio BAR through /dev/mem.
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS iomem=relaxed l2.pattern=$PATTERN l2.button=1 l2.garbage=1"

step "the driver domain serves a 16 MiB image with two request queues"
truncate -s 16M $W/disk.img
$DD serve --blk $W/disk.img --socket $W/blk.sock --queues 2 > $W/dd.log 2>&1 &
dd_pid=$!
background $dd_pid

step "boot Linux under splitvmm-vmm: 2 vCPUs, 256 MiB, the disk on virtio-pci"
echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz --vcpus 2 --mem-mib 256 --blk-socket $W/blk.sock --share-all-ram --cmdline '$CMDLINE'"
RUST_LOG=info timeout 80 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
    --vcpus 2 --mem-mib 256 --blk-socket $W/blk.sock --share-all-ram \
    --cmdline "$CMDLINE" > $W/console.log 2> $W/vmm.log &
vmm=$!
background $vmm
step "wait for the guest to finish its I/O, then press its power button"
i=0
until grep -q "^L2-WAITING-BUTTON" $W/console.log; do
    kill -0 $vmm 2>/dev/null || break
    [ $i -ge 600 ] && { kill $vmm; fail "the guest did not wait for the power button within 60 s"; }
    sleep 0.1
    i=$((i + 1))
done
kill -USR1 $vmm 2>/dev/null && echo "+ kill -USR1 $vmm (ACPI power button)"
wait $vmm
rc=$?
grep -E "Linux version|^L2-|smpboot: Total|virtio_blk|vda|Kernel panic|BUG|WARNING|XSAVE" $W/console.log | head -40
echo "--- VMM log:"
grep -vE "unknown port|unbacked GPA" $W/vmm.log | tail -12
grep -q "Linux version" $W/console.log || fail "no 'Linux version' line on the guest console"
grep -q "^L2-CPUS-ONLINE 0-1" $W/console.log || fail "the guest did not report CPUs 0-1 online"
grep -q "^L2-DONE" $W/console.log || fail "the guest's /init did not finish"
grep -q "^L2-BUTTON pressed" $W/console.log || fail "the guest did not see the power button"
[ "$rc" = 0 ] || fail "splitvmm-vmm exited $rc (0 = the guest powered off through ACPI S5)"
grep -q "guest powered off" $W/vmm.log || fail "the VMM did not report an ACPI power-off"
grep -q "sharing all guest RAM" $W/vmm.log || fail "the VMM did not log sharing all RAM"
grep -qE "^L2-IRQ .*PCI-MSI.*virtio0-req.0" $W/console.log || fail "no virtio MSI-X vector in the guest's /proc/interrupts"
grep -qE "^L2-IRQ .*PCI-MSI.*virtio0-req.1" $W/console.log ||
    fail "the disk's second request queue (the backend serves two) has no MSI-X vector in the guest"

step "the pattern is in the image file (read by the lab VM, not the guest)"
got=$(dd if=$W/disk.img bs=512 skip=8 count=1 2>/dev/null | head -c ${#PATTERN})
echo "sector 8: $got"
[ "$got" = "$PATTERN" ] || fail "the image holds '$got', expected '$PATTERN'"

step "the guest's garbage was ignored and the disk kept working"
grep "^L2-GARBAGE" $W/console.log
grep -q "^L2-GARBAGE id 10421af4 class 01800001 queue9-size 0x0000" $W/console.log ||
    fail "read-only configuration registers changed, or a nonexistent queue has a size"
grep -qE "totals: .*virtio_notify_exit=1( |$)" $W/vmm.log || fail "the stray notify was not counted"
grep -q "write .* to BAR0 0x7000 ignored" $W/vmm.log || fail "the VMM did not log the write to unused BAR space"
after=$(dd if=$W/disk.img bs=512 skip=16 count=1 2>/dev/null | head -c $((${#PATTERN} + 14)))
echo "sector 16: $after"
[ "$after" = "$PATTERN-after-garbage" ] || fail "the write after the garbage did not reach the image"

step "every process is reaped"
kill $dd_pid
wait_gone $dd_pid 5 || fail "the driver domain outlived its SIGTERM by 5 s"
kill -0 $vmm 2>/dev/null && fail "splitvmm-vmm still runs"
# busybox timeout's watcher notices its command is gone within a second.
i=0
while left=$(ps -o pid,args | grep -E '[s]plitvmm-vmm|[d]river-domain serve'); [ -n "$left" ]; do
    [ $i -ge 30 ] && fail "processes left after 3 s: $left"
    sleep 0.1
    i=$((i + 1))
done
echo "splitvmm-vmm exited 0 on the guest's ACPI power-off after the power button; driver domain stopped"

# The same guest through the toolstack: `splitvmm up --stay` with a host file (kind = "linux"),
# the disk attached by the xenbus walk before the guest boots, and `splitvmm shutdown`.
step "splitvmm up --stay: a kind = \"linux\" guest with a disk served by the driver domain"
UP_PATTERN=$LAB_PATTERN-up
truncate -s 16M $W/up.img
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[driver_domain]
name = "driver"
domid = 1
[[guest]]
name = "debian"
domid = 2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS l2.pattern=$UP_PATTERN l2.console=1 l2.button=1"
memory = 256
vcpus = 2
share = "all-ram"
[[guest.disk]]
image = "$W/up.img"
queues = 2
TOML
SV="/bin/splitvmm --run-dir $W/run"
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
GLOG=$W/run/logs/debian.log
# wait_log PATTERN SECONDS: waits for a line of the guest's log.
wait_log() {
    i=0
    until grep -q "$1" $GLOG 2>/dev/null; do
        kill -0 $up 2>/dev/null || { cat $W/up.log; fail "splitvmm up ended early"; }
        [ $i -ge $(($2 * 10)) ] && { cat $W/up.log; fail "no '$1' in the guest's log within $2 s"; }
        sleep 0.1
        i=$((i + 1))
    done
}
# Unanchored: the VMM's log lines share the file and can land in front of a guest line.
wait_log "L2-CONSOLE-READY" 60
grep -E "vbd .*Connected|created" $W/up.log
step "the driver domain and the Linux guest's VMM are confined"
assert_confined $up
run $SV list
echo "$OUT" | grep -E "^2 +debian .* all-ram$" || fail "splitvmm list does not show debian with share all-ram"
run $SV list --json
echo "$OUT" | grep -qE '"share": ?"all-ram"' || fail "list --json has no share all-ram"
step "splitvmm console: a typed line reaches the guest's COM1 and its answer comes back"
TYPED=typed-$LAB_PATTERN
echo "+ $SV console debian   (types '$TYPED', then Ctrl-] once the guest answered)"
(
    printf '%s\n' "$TYPED"
    i=0
    # The whole answer, not its start: the guest writes it a byte at a time through the UART
    # (one exit each), and detaching mid-line cuts what the client and this check see.
    until grep -q "^L2-CONSOLE-GOT $TYPED" $GLOG || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done
    printf '\035'
) | $SV console debian > $W/console.out 2>&1
grep -E "L2-CONSOLE|attached|detached" $W/console.out
grep -q "^L2-CONSOLE-GOT $TYPED" $GLOG || fail "the guest did not read '$TYPED' from its console"
grep -q "L2-CONSOLE-GOT $TYPED" $W/console.out || fail "the guest's answer did not come back through the console"
grep -q "\[detached\]" $W/console.out || fail "Ctrl-] did not detach"
wait_log "L2-WAITING-BUTTON" 30
step "splitvmm shutdown presses the guest's power button; the toolstack reaps the VMM"
run $SV shutdown debian
says "shut down debian"
grep -E "Linux version|^L2-|smpboot: Total|Kernel panic|BUG|splitvmm-vmm:" $GLOG | head -20
grep -q "Linux version" $GLOG || fail "no 'Linux version' line in the guest's log"
grep -q "^L2-CPUS-ONLINE 0-1" $GLOG || fail "the guest did not report CPUs 0-1 online"
grep -qE "^L2-IRQ .*PCI-MSI.*virtio0-req" $GLOG || fail "no virtio MSI-X vector in the guest's /proc/interrupts"
grep -qE "^L2-IRQ .*PCI-MSI.*virtio0-req.1" $GLOG ||
    fail "the host file's queues = 2 did not reach the guest (no second request queue vector)"
grep -q "^L2-BUTTON pressed" $GLOG || fail "the guest did not see the power button"
grep -q "guest powered off" $GLOG || fail "the VMM did not report an ACPI power-off"
got=$(dd if=$W/up.img bs=512 skip=8 count=1 2>/dev/null | head -c ${#UP_PATTERN})
echo "sector 8 of up.img: $got"
[ "$got" = "$UP_PATTERN" ] || fail "the image holds '$got', expected '$UP_PATTERN'"
left=$(ps -o pid,args | grep '[s]plitvmm-vmm')
[ -z "$left" ] || fail "splitvmm-vmm left after the shutdown: $left"
run $SV xs ls /local/domain
echo "$OUT" | grep -E "^/local/domain/(2|1/(backend|data/io)/vbd/2)" && fail "domain 2 or its devices are still in the store"
run $SV list
echo "$OUT" | grep -q debian && fail "splitvmm list still shows debian"

step "splitvmm create: a Linux guest that powers off by itself is reaped by the toolstack"
ALONE_PATTERN=$LAB_PATTERN-alone
truncate -s 16M $W/alone.img
cat > $W/alone.toml <<TOML
name = "alone"
domid = 3
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "console=ttyS0 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS l2.pattern=$ALONE_PATTERN"
memory = 256
share = "all-ram"
[[disk]]
image = "$W/alone.img"
TOML
run $SV create $W/alone.toml
says "created alone (domain 3)"
i=0
until grep -q "alone: powered off" $W/up.log; do
    [ $i -ge 600 ] && { tail -5 $W/run/logs/alone.log; fail "alone was not reaped within 60 s"; }
    sleep 0.1
    i=$((i + 1))
done
grep -E "alone: " $W/up.log
grep -E "^L2-DONE|splitvmm-vmm:" $W/run/logs/alone.log
got=$(dd if=$W/alone.img bs=512 skip=8 count=1 2>/dev/null | head -c ${#ALONE_PATTERN})
[ "$got" = "$ALONE_PATTERN" ] || fail "alone.img holds '$got', expected '$ALONE_PATTERN'"
left=$(ps -o pid,stat,args | grep '[s]plitvmm-vmm')
[ -z "$left" ] || fail "splitvmm-vmm left (or a zombie) after alone powered off: $left"
run $SV xs ls /local/domain
echo "$OUT" | grep -E "^/local/domain/(3|1/(backend|data/io)/vbd/3)" && fail "domain 3 or its devices are still in the store"

kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain')
[ -z "$left" ] || fail "processes left: $left"
echo "splitvmm shutdown powered the Linux guest off through ACPI; VMM, driver domain and store entries gone"
