# l2-boots (diagnostic, not in the default list): an L2 Linux guest (2 vCPUs, 160 MiB, no
# initramfs) boots twelve times over under splitvmm-vmm --linux. Each boot runs the kernel's
# early boot, SMP bring-up and initcalls (about 10 s of lab VM time), ends in "VFS: Unable to
# mount root fs", and `panic=-1 reboot=t` resets it by triple fault, which ends its VMM with
# status 100. It exists to reproduce the lab VM's stall (docs/lab.md, "Known flake") several
# times faster per L2 boot than the `linux` scenario.
W=/tmp/l2-boots
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
CMDLINE="console=ttyS0 loglevel=6 panic=-1 reboot=t io_delay=none no_timer_check $LAB_L2_ARGS"
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
    timeout 150 /bin/splitvmm-vmm --linux --kernel /lab/linux/bzImage --vcpus 2 --mem-mib 160 \
        --cmdline "$CMDLINE" > $W/console.log 2> $W/vmm.log &
    pid=$!
    background $pid
    wait $pid
    rc=$?
    step "boot $i: VMM exit status $rc"
    grep -q "Kernel panic - not syncing: VFS" $W/console.log ||
        { tail -5 $W/console.log $W/vmm.log; fail "boot $i did not reach the root mount"; }
    [ "$rc" = 100 ] || fail "boot $i: the VMM exited $rc, not 100 (guest reset)"
    mv $W/console.log $W/console-$i.txt
done
