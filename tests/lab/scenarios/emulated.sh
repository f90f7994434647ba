# emulated: full emulation. `splitvmm-vmm --linux --nvme IMG,rw` gives the lab's Debian kernel
# (an L2 guest, 1 vCPU, 256 MiB) an NVMe controller emulated by the VMM: every register and
# doorbell access of the guest's stock nvme driver traps to the VMM, which walks the queues in
# guest memory, does the I/O on a file of the lab VM and raises MSI-X through KVM irqfds. The
# guest checks the driver bound it (/sys), reads block 0 (put there by the lab VM), writes
# this run's pattern at 1 MiB with O_DIRECT and runs an I/O phase whose exits the VMM counts
# (at least one MMIO exit per request: this is the approach where the VMM is on the data
# path); the lab VM then reads the pattern from the file. A second boot gets the same file
# read-only (`--nvme IMG`): the guest sees a read-only disk, its write fails, the file is
# unchanged.
W=/tmp/emulated
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
VMM=/bin/splitvmm-vmm
[ -x $VMM ] || fail "no $VMM in the lab VM"
IMG=$W/emulated-nvme.img
BLOCK0=EMU-BLOCK0-$LAB_PATTERN
PATTERN=$LAB_PATTERN-EMU
REQUESTS=64
truncate -s 64M $IMG
printf '%s' "$BLOCK0" | dd of=$IMG conv=notrunc 2>/dev/null
# Short nvme_core timeouts: a controller mistake costs 5 s, not 60.
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check nvme_core.multipath=N nvme_core.io_timeout=5 nvme_core.admin_timeout=5 l2.nvme=1 l2.nvme_requests=$REQUESTS"

# boot NAME NVME-SPEC PATTERN: boots the guest with one emulated NVMe disk; output in $W/NAME.*
boot() {
    echo "+ $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz --vcpus 1 --mem-mib 256 --nvme $2 --cmdline '$CMDLINE l2.pattern=$3'"
    RUST_LOG=info timeout 100 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
        --vcpus 1 --mem-mib 256 --nvme "$2" --cmdline "$CMDLINE l2.pattern=$3" \
        > $W/$1.console 2> $W/$1.vmm &
    vmm=$!
    background $vmm
    wait $vmm
    rc=$?
    grep -E "Linux version|^L2-|nvme|Kernel panic|BUG|WARNING" $W/$1.console | head -30
    echo "--- VMM log:"
    grep -vE "unknown port|unbacked GPA" $W/$1.vmm | tail -25
    grep -q "Linux version" $W/$1.console || fail "$1: no 'Linux version' line on the guest console"
    [ "$rc" = 0 ] || fail "$1: splitvmm-vmm exited $rc (0 = the guest powered off)"
    grep -q "^L2-NVME-DRIVER nvme id 0x1b36:0x00f0 class 0x010802" $W/$1.console ||
        fail "$1: the stock nvme driver did not bind the emulated controller"
    grep -q "^L2-NVME-BLOCK0 $BLOCK0" $W/$1.console || fail "$1: the guest did not read block 0 as the lab VM wrote it"
    grep -qE "^L2-IRQ .*PCI-MSI.*nvme0q1" $W/$1.console || fail "$1: no MSI-X interrupt of the I/O queue in the guest's /proc/interrupts"
    grep -q "nvme: shutdown notification; shutdown complete" $W/$1.vmm || fail "$1: no shutdown notification at poweroff"
    grep -q "emulated NVMe 0: " $W/$1.vmm || fail "$1: the VMM printed no controller statistics"
}

step "boot Linux with an emulated NVMe controller on a writable file"
boot rw "$IMG,rw" "$PATTERN"
grep -q "^L2-NVME-DRIVER .* ro 0" $W/rw.console || fail "the writable disk is read-only in the guest"
grep -q "^L2-NVME-WRITTEN" $W/rw.console || fail "the guest did not write its pattern"

step "exits of the emulated controller's I/O path"
line=$(grep "^I/O phase per request:" $W/rw.vmm)
grep "^I/O phase " $W/rw.vmm
grep "emulated NVMe 0: " $W/rw.vmm
[ -n "$line" ] || fail "the VMM printed no per-request exit count"
n=$(echo "$line" | sed -n 's/.* requests=\([0-9]*\) .*/\1/p')
exits=$(echo "$line" | sed -n 's/.*(vmm_exits=\([0-9]*\),.*/\1/p')
doorbells=$(grep "^I/O phase [0-9]" $W/rw.vmm | sed -n 's/.* nvme_doorbell=\([0-9]*\).*/\1/p')
echo "guest requests in the I/O phase: $n; exits to the VMM: $exits, of which doorbell writes: $doorbells"
[ "${n:-0}" -ge $REQUESTS ] || fail "the guest made ${n:-0} requests, expected $REQUESTS"
# Each request rings a submission doorbell and a completion doorbell: emulation is on the path.
[ "${doorbells:-0}" -ge "$n" ] || fail "${doorbells:-0} doorbell exits for $n requests: fewer than one per request"

step "the lab VM reads the guest's pattern from the file"
got=$(dd if=$IMG bs=4096 skip=256 count=1 2>/dev/null | head -c ${#PATTERN})
[ "$got" = "$PATTERN" ] || fail "the file holds '$got' at 1 MiB, expected '$PATTERN'"
echo "file at 1 MiB: $got"
sum=$(md5sum < $IMG)

step "the same file read-only: the guest cannot write it"
boot ro "$IMG" "$PATTERN-RO"
grep -q "^L2-NVME-DRIVER .* ro 1" $W/ro.console || fail "the read-only disk is writable in the guest"
grep -q "^L2-NVME-WRITTEN" $W/ro.console && fail "the guest wrote to a read-only emulated disk"
[ "$(md5sum < $IMG)" = "$sum" ] || fail "the read-only file changed"
echo "read-only file unchanged"
pgrep -f splitvmm-vmm >/dev/null && fail "a splitvmm-vmm is left running"
echo "emulated: PASS"
