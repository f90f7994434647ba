# passthrough: an NVMe VF assigned to a Linux guest of splitvmm-vmm through VFIO. The guest's
# stock nvme driver binds the VF (Identify, I/O queues, MSI-X), writes this run's pattern and
# runs an I/O phase whose exits the VMM counts (printed per request: near zero, the doorbells
# are KVM memory slots and the completions KVM irqfds); after the guest is gone the lab VM
# reads the pattern back through the VF's namespace with its own kernel nvme driver.
W=/tmp/passthrough
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
VMM=/bin/splitvmm-vmm
[ -x $VMM ] || fail "no $VMM in the lab VM"
PATTERN=$LAB_PATTERN-VF
REQUESTS=256
# nvme_core.multipath=N: the namespace is the controller's own blk-mq disk (with multipath its
# head node is bio-based and keeps no request counters).
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check iomem=relaxed nvme_core.multipath=N l2.pattern=$PATTERN l2.nvme=1 l2.nvme_requests=$REQUESTS"

# read_vf_block VF BLOCK LEN: LEN bytes of 4 KiB block BLOCK of the VF's namespace, read by the
# lab VM's kernel nvme driver (the VF is bound to nvme for it, then back to vfio-pci).
read_vf_block() {
    run $DD hw bind $1 nvme
    ctrl=$(ls $SYS/$1/nvme 2>/dev/null | head -1)
    [ -n "$ctrl" ] || fail "no nvme controller on $1 after binding nvme"
    i=0
    until [ -b /dev/${ctrl}n1 ]; do
        [ $i -ge 100 ] && fail "no /dev/${ctrl}n1 within 10 s"
        sleep 0.1; i=$((i + 1))
    done
    GOT=$(dd if=/dev/${ctrl}n1 bs=4096 skip=$2 count=1 iflag=direct 2>/dev/null | head -c $3)
    run $DD hw bind $1 vfio-pci
}

step "VFs up, VF1 on vfio-pci"
[ "$(numvfs)" = 0 ] || vfs_down
vfs_up
run $DD hw bind $VF1 vfio-pci
[ -c /dev/vfio/$(group_of $VF1) ] || fail "no /dev/vfio/$(group_of $VF1)"

step "boot Linux under splitvmm-vmm with VF1 assigned (1 vCPU, 256 MiB)"
echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz --vcpus 1 --mem-mib 256 --vfio $VF1 --cmdline '$CMDLINE'"
RUST_LOG=info timeout 100 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
    --vcpus 1 --mem-mib 256 --vfio $VF1 --cmdline "$CMDLINE" > $W/console.log 2> $W/vmm.log &
vmm=$!
background $vmm
wait $vmm
rc=$?
grep -E "Linux version|^L2-|nvme|Kernel panic|BUG|WARNING" $W/console.log | head -30
echo "--- VMM log:"
grep -vE "unknown port|unbacked GPA" $W/vmm.log | tail -25
grep -q "Linux version" $W/console.log || fail "no 'Linux version' line on the guest console"
[ "$rc" = 0 ] || fail "splitvmm-vmm exited $rc (0 = the guest powered off)"
grep -q "guest RAM (256 MiB) DMA-mapped at IOVA = GPA 0" $W/vmm.log || fail "the VMM did not DMA-map guest RAM"
grep -q "MSI-X enabled" $W/vmm.log || fail "the guest never enabled the VF's MSI-X"
grep -q "^L2-NVME-WRITTEN" $W/console.log || fail "the guest did not write its pattern through the VF"
grep -qE "^L2-IRQ .*nvme0q1" $W/console.log || fail "no nvme I/O queue interrupt in the guest's /proc/interrupts"
grep -q "reset at the end of the assignment" $W/vmm.log || fail "the VMM did not reset the VF when the guest ended"

step "exits of the VF's I/O path"
line=$(grep "^I/O phase per request:" $W/vmm.log)
grep "^I/O phase " $W/vmm.log
[ -n "$line" ] || fail "the VMM printed no per-request exit count"
n=$(echo "$line" | sed -n 's/.* requests=\([0-9]*\) .*/\1/p')
exits=$(echo "$line" | sed -n 's/.*(vmm_exits=\([0-9]*\),.*/\1/p')
echo "guest requests in the I/O phase: $n; exits to the VMM: $exits"
[ "${n:-0}" -ge $REQUESTS ] || fail "the guest made ${n:-0} requests, expected $REQUESTS"
# The end marker's own write is the one expected exit.
[ "${exits:-99}" -le 2 ] || fail "$exits exits to the VMM during $n requests on the VF"
grep "^I/O phase [0-9]" $W/vmm.log | grep -qE "assigned_bar_exit|msix_table_access|pci_config" &&
    fail "the VF's I/O path went through the VMM"

step "the pattern, read through the VF's namespace by the lab VM after the guest is gone"
kill -0 $vmm 2>/dev/null && fail "splitvmm-vmm still runs"
read_vf_block $VF1 256 ${#PATTERN}
echo "block 256 through $VF1: $GOT"
[ "$GOT" = "$PATTERN" ] || fail "the VF's namespace holds '$GOT' at 1 MiB, expected '$PATTERN'"

step "tear down"
vfs_down
echo "passthrough: ok"
