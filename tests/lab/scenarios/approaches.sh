# approaches: the source text's three I/O approaches and native, one workload, one backing
# store. The store is the lab's NVMe namespace (QEMU's emulated NVMe, nvme.img), reached in
# every row through a VF of the PF: VF2 is bound to the lab VM's own nvme driver (its block
# device backs the emulated controller and the virtio-blk backend, and is the native row); VF1
# is assigned to the guest. The guest (1 vCPU, 256 MiB, the lab's Debian kernel) runs the same
# program in each row (tests/lab/guest-init, l2.bench: this run's pattern at 8 MiB, then N
# direct 4 KiB requests at QD1, half writes, half reads, between the VMM's phase marks):
#   emulated  splitvmm-vmm --nvme DEV,rw   (the VMM emulates an NVMe controller; stock nvme)
#   virtio    driver-domain serve --blk DEV; splitvmm-vmm --blk-socket (virtio-pci, virtio_blk)
#   vf        splitvmm-vmm --vfio VF1      (direct assignment; stock nvme)
#   native    the same dd commands in the lab VM on DEV
# Per row: ops/s (the guest's clock; nested TCG makes it relative only), % of native, exits to
# the VMM per op by reason and KVM exits per op (exact), interrupts per op (the guest's
# /proc/interrupts, I/O queue vectors). Each row asserts what makes it that approach, and the
# lab VM reads each row's pattern back from the namespace.
W=/tmp/approaches
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
VMM=/bin/splitvmm-vmm
N=${LAB_APPROACHES_REQUESTS:-256}
CMD="console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check nvme_core.multipath=N nvme_core.io_timeout=5 nvme_core.admin_timeout=5 l2.bench_requests=$N"

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

ROWS=$W/rows
: > $ROWS
# check_pattern ROW: the row's pattern at 8 MiB of the namespace, read directly by the lab VM.
check_pattern() {
    want=$LAB_PATTERN-$1
    got=$(dd if=$DEV bs=4096 skip=2048 count=1 iflag=direct 2>/dev/null | head -c ${#want})
    [ "$got" = "$want" ] || fail "$1: the namespace holds '$got' at 8 MiB, expected '$want'"
    echo "$1: pattern read back by the lab VM from $DEV"
}
# guest_row ROW DEV VMM-ARGS...: boots the guest on DEV (vda or nvme0n1) and records its row.
guest_row() {
    row=$1 bdev=$2
    shift 2
    echo "+ $VMM --linux ... $* --cmdline '$CMD l2.bench=$bdev l2.pattern=$LAB_PATTERN-$row'"
    RUST_LOG=info timeout 150 $VMM --linux --kernel /lab/linux/bzImage --initrd /lab/linux/initrd.gz \
        --vcpus 1 --mem-mib 256 "$@" --cmdline "$CMD l2.bench=$bdev l2.pattern=$LAB_PATTERN-$row" \
        > $W/$row.console 2> $W/$row.vmm &
    vmm=$!
    background $vmm
    wait $vmm
    rc=$?
    grep -E "^L2-BENCH|^L2-WARN|Kernel panic" $W/$row.console
    [ "$rc" = 0 ] || { tail -20 $W/$row.vmm; fail "$row: splitvmm-vmm exited $rc"; }
    grep -q "^L2-BENCH-WRITTEN" $W/$row.console || fail "$row: the guest did not write its pattern"
    line=$(grep "^L2-BENCH requests" $W/$row.console)
    [ -n "$line" ] || fail "$row: no benchmark result from the guest"
    set -- $line
    req=$3 t0=$5 t1=$6 irq=$8
    [ "$req" -ge "$N" ] || fail "$row: $req requests completed, expected $N"
    phase=$(grep "^I/O phase [0-9]" $W/$row.vmm | head -1 | sed 's/^I\/O phase [^:]*: //')
    [ -n "$phase" ] || fail "$row: the VMM printed no I/O phase"
    echo "$row $req $t0 $t1 $irq $phase" >> $ROWS
}
# per_op ROW COUNTER: the row's COUNTER (from the VMM's I/O phase) per request.
per_op() {
    awk -v r="$1" -v c="$2" '$1 == r { for (i = 6; i <= NF; i++) { split($i, kv, "="); if (kv[1] == c) v = kv[2] } printf "%.3f", (v + 0) / $2 }' $ROWS
}

step "row emulated: the VMM's emulated NVMe controller on $DEV"
guest_row emulated nvme0n1 --nvme "$DEV,rw"
grep -q "^L2-BENCH-DEVICE nvme0n1 driver nvme" $W/emulated.console || fail "emulated: the stock nvme driver did not bind"
check_pattern emulated
d=$(per_op emulated nvme_doorbell)
echo "emulated: $d doorbell exits per request"
awk -v d="$d" 'BEGIN { exit !(d >= 1) }' || fail "emulated: fewer than one MMIO (doorbell) exit per request ($d)"

step "row virtio: virtio-blk through the driver domain serving $DEV"
$DD serve --blk $DEV --socket $W/blk.sock > $W/dd.log 2>&1 &
dd_pid=$!
background $dd_pid
guest_row virtio vda --blk-socket $W/blk.sock --share-all-ram
grep -q "^L2-BENCH-DEVICE vda driver virtio_blk" $W/virtio.console || fail "virtio: virtio_blk did not bind"
kill $dd_pid 2>/dev/null
wait_gone $dd_pid 10 || fail "the driver domain outlived its SIGTERM"
check_pattern virtio

step "row vf: $VF1 assigned to the guest"
guest_row vf nvme0n1 --vfio $VF1
grep -q "^L2-BENCH-DEVICE nvme0n1 driver nvme" $W/vf.console || fail "vf: the stock nvme driver did not bind the VF"
check_pattern vf
v=$(per_op vf mmio_write)
awk -v v="$v" 'BEGIN { exit !(v < 0.05) }' || fail "vf: $v MMIO exits to the VMM per request (expected near zero)"

step "row native: the lab VM on $DEV"
irqsum() { awk -v p="${ctrl}q[1-9]" '$NF ~ p { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts; }
printf '%s' "$LAB_PATTERN-native" | dd of=$DEV bs=4096 seek=2048 conv=sync oflag=direct 2>/dev/null
ib=$(irqsum)
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=$DEV bs=4096 seek=1024 count=$((N / 2)) oflag=direct 2>/dev/null
dd if=$DEV of=/dev/null bs=4096 skip=1024 count=$((N / 2)) iflag=direct 2>/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
ia=$(irqsum)
echo "native $N $t0 $t1 $((ia - ib)) -" >> $ROWS
check_pattern native

step "the table"
cat $ROWS
awk '
    { rows[NR] = $0; name[NR] = $1; n[NR] = $2; ops[NR] = $2 / ($4 - $3); irq[NR] = $5 / $2
      if ($1 == "native") native = ops[NR]
      vmm = 0; kvm = 0; reasons = ""
      for (i = 6; i <= NF; i++) {
          split($i, kv, "=")
          if (kv[1] ~ /^(pio_in|pio_out|mmio_read|mmio_write)$/) vmm += kv[2]
          if (kv[1] == "kvm.exits") kvm = kv[2]
          if (kv[1] ~ /^(nvme_doorbell|nvme_register|msix_table_access|virtio_pci_config|virtio_notify_exit|pci_config_read|pci_config_write|assigned_bar_exit|kvm\.mmio_exits|kvm\.io_exits|kvm\.halt_exits|kvm\.irq_injections|kvm\.insn_emulation)$/)
              reasons = reasons sprintf(" %s=%.2f", kv[1], kv[2] / $2)
      }
      vmmx[NR] = vmm / $2; kvmx[NR] = kvm / $2; why[NR] = (reasons == "" ? " -" : reasons) }
    END {
      printf "| approach | requests | ops/s | %% of native | exits to the VMM / op | KVM exits / op | interrupts / op | per op by reason |\n"
      printf "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
      for (i = 1; i <= NR; i++) {
          if (name[i] == "native") { v = "-"; k = "-" } else { v = sprintf("%.3f", vmmx[i]); k = sprintf("%.2f", kvmx[i]) }
          printf "| %s | %d | %.0f | %.0f%% | %s | %s | %.2f |%s |\n", name[i], n[i], ops[i], 100 * ops[i] / native, v, k, irq[i], why[i]
      }
    }' $ROWS | tee $W/table.md
echo "APPROACHES-TABLE-END"

step "VFs down"
run $DD hw bind $VF2 vfio-pci
vfs_down
