# approaches: the source text's three I/O approaches and native, one guest program, one
# backing store, through `splitvmm bench-approaches` (control-vmm/src/bench). The store is the
# lab's NVMe namespace (QEMU's emulated NVMe, nvme.img), reached in every row through a VF of
# the PF: VF2 is bound to the lab VM's own nvme driver (its block device backs the emulated
# controller and the virtio-blk backend, and is the native row's disk); VF1 is assigned to the
# guest. The guest (1 vCPU, 256 MiB, the lab's Debian kernel) runs tests/lab/l2-bench once per
# workload (4 KiB O_DIRECT random read, random write, at QD1 then QD32, for
# LAB_APPROACHES_SECONDS each, from 16 MiB on) between the VMM's phase marks:
#   emulated  splitvmm-vmm --nvme DEV,rw   (the VMM emulates an NVMe controller; stock nvme)
#   virtio    driver-domain serve --blk DEV; splitvmm-vmm --blk-socket (virtio-pci, virtio_blk)
#   vf        splitvmm-vmm --vfio VF1      (direct assignment; stock nvme)
#   native    the same l2-bench in the lab VM on DEV (no marks)
# The command checks each row (driver bound, its pattern read back from DEV by the lab VM,
# >= 1 doorbell exit per request at QD1 for emulation, < 0.05 MMIO exits to the VMM per
# request for the VF) and prints the table of docs/approaches.md; this checks its refusals and
# the table's shape from outside.
W=/tmp/approaches
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
[ -x /bin/l2-bench ] || fail "l2-bench was not packed"
SECS=${LAB_APPROACHES_SECONDS:-2}
BENCH="splitvmm bench-approaches --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz"

step "VFs up: VF1 on vfio-pci (for the guest), VF2 on the lab VM's nvme driver (the store)"
[ "$(numvfs)" = 0 ] || vfs_down
vfs_up
run $DD hw bind $VF1 vfio-pci
run $DD hw bind $VF2 nvme
ctrl=$(ls $SYS/$VF2/nvme 2>/dev/null | head -1)
[ -n "$ctrl" ] || fail "no nvme controller on $VF2"
DEV=/dev/${ctrl}n1
i=0
until [ -b $DEV ]; do
    [ $i -ge 100 ] && fail "no $DEV within 10 s"
    sleep 0.1; i=$((i + 1))
done
echo "store: $DEV ($(cat /sys/block/${ctrl}n1/size) sectors), the namespace of $VF2"

step "refusals: no store, a VF not on vfio-pci (exit 3, nothing run)"
expect_fail 3 "no store /dev/nonexistent" $BENCH --store /dev/nonexistent --vf $VF1
expect_fail 3 "is on nvme, not vfio-pci" $BENCH --store $DEV --vf $VF2
expect_fail 3 "needs --vf" $BENCH --store $DEV --rows vf

# Exits by hardware reason: the lab kernel's kvm_exit histogram (as linux-bench reads it).
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null || fail "no tracefs"
echo 'hist:keys=exit_reason:size=256' > $T/events/kvm/kvm_exit/trigger ||
    fail "cannot set a histogram trigger on kvm_exit"

step "splitvmm bench-approaches --store $DEV --vf $VF1 --seconds $SECS"
$BENCH --store $DEV --vf $VF1 --seconds $SECS --work-dir $W --row-timeout-s 170 \
    --exit-reason-hist $T/events/kvm/kvm_exit/hist > $W/table.md 2> $W/bench.log
rc=$?
echo '!hist:keys=exit_reason:size=256' > $T/events/kvm/kvm_exit/trigger
grep -v "^bench-approaches: \"" $W/bench.log
for r in emulated virtio vf; do grep -hE "^L2-WARN|Kernel panic" $W/$r.console 2>/dev/null; done
echo "--- the table"
cat $W/table.md
echo "APPROACHES-TABLE-END"
[ "$rc" = 0 ] || { tail -20 $W/*.vmm 2>/dev/null; fail "bench-approaches exited $rc"; }
rows=$(grep -c '^| [a-z]* | QD' $W/table.md)
[ "$rows" = 16 ] || fail "$rows lines in the table, expected 16 (4 approaches x 4 workloads)"
for r in emulated virtio vf native; do
    grep -q "$r: pattern read back from $DEV" $W/bench.log || fail "$r: no pattern check"
done
# The driver domain is woken for virtio requests: its thread runs per request are > 0.
awk -F'|' '$2 ~ /virtio/ { split($10, t, /[(+)]/); if (t[3] + 0 <= 0) bad = 1 } END { exit bad }' $W/table.md ||
    fail "virtio: no driver-domain thread runs counted"

step "VFs down"
run $DD hw bind $VF2 vfio-pci
vfs_down
