# linux: an unmodified Debian cloud kernel (the lab's own bzImage) boots as an L2 guest of
# splitvmm-vmm with 2 vCPUs: ACPI (hardware-reduced), the in-kernel irqchip, COM1, PCI. Its
# initramfs reports the CPUs online and powers off; the ACPI S5 write must end the VMM.
W=/tmp/linux
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
VMM=/bin/splitvmm-vmm
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check"

step "boot Linux under splitvmm-vmm, 2 vCPUs, 256 MiB"
echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz --vcpus 2 --mem-mib 256 --cmdline '$CMDLINE'"
timeout 80 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
    --vcpus 2 --mem-mib 256 --cmdline "$CMDLINE" > $W/console.log 2> $W/vmm.log &
vmm=$!
background $vmm
wait $vmm
rc=$?
grep -E "Linux version|^L2-|ACPI: (PM|Power|Reduced)|smpboot|PCI|pci 0000|virtio|Kernel panic|BUG" $W/console.log | head -60
echo "--- VMM log (last lines):"
tail -8 $W/vmm.log
grep -q "Linux version" $W/console.log || fail "no 'Linux version' line on the guest console"
grep -q "^L2-CPUS-ONLINE 0-1" $W/console.log || fail "the guest did not report CPUs 0-1 online"
grep -q "^L2-DONE" $W/console.log || fail "the guest's /init did not finish"
[ "$rc" = 0 ] || fail "splitvmm-vmm exited $rc (0 = the guest powered off through ACPI S5)"
grep -q "guest powered off" $W/vmm.log || fail "the VMM did not report an ACPI power-off"
kill -0 $vmm 2>/dev/null && fail "splitvmm-vmm still runs"
echo "splitvmm-vmm exited 0: ACPI power-off reached the VMM"
