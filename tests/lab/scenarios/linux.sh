# linux: an unmodified Debian cloud kernel (the lab's own bzImage) boots as an L2 guest of
# splitvmm-vmm with 2 vCPUs: hardware-reduced ACPI, the in-kernel irqchip, COM1, PCI, and a
# virtio-blk disk (virtio-pci, MSI-X) served by the driver domain over vhost-user. The guest's
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
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check iomem=relaxed l2.pattern=$PATTERN l2.button=1 l2.garbage=1"

step "the driver domain serves a 16 MiB image"
truncate -s 16M $W/disk.img
$DD serve --blk $W/disk.img --socket $W/blk.sock > $W/dd.log 2>&1 &
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
grep -qE "^L2-IRQ .*PCI-MSI.*virtio0-req" $W/console.log || fail "no virtio MSI-X vector in the guest's /proc/interrupts"

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
