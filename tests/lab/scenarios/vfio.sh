# vfio: the driver domain owns a VF through VFIO: config space, BAR0 (NVMe CAP/VS), a DMA-mapped
# buffer holding the admin and I/O queues, Identify completed by MSI-X interrupt, block 0 read
# through the VF matching this run's pattern; then the host asks for the VF back and gets it.
[ -n "$LAB_PATTERN" ] || fail "no lab.pattern on the kernel command line"
vfs_up
run $DD hw bind $VF1 vfio-pci
step "user-space NVMe probe through VFIO"
run $DD hw vfio-probe $VF1 --expect "$LAB_PATTERN"
says "config space vendor=0x1b36"
says "NVMe CAP=0x"
says "interrupts by Msix"
says "Identify Controller by interrupt: vid=0x1b36"
says "block 0 matches the expected pattern"
echo "$OUT" | grep -q ": \([0-9]*\) commands, \1 completed by interrupt" || fail "not every command completed by interrupt"

step "the host asks for the VF back while the driver domain holds it"
$DD hw hold $VF1 --timeout 30 > /tmp/hold.out 2>&1 &
holder=$!
background $holder
i=0
until grep -q '^HOLDING' /tmp/hold.out; do
    kill -0 $holder 2>/dev/null || { cat /tmp/hold.out; fail "hold exited early"; }
    [ $i -ge 200 ] && { cat /tmp/hold.out; fail "hold did not take the device within 20 s"; }
    sleep 0.1; i=$((i + 1))
done
echo "+ echo 0 > $SYS/$PF/sriov_numvfs   (while $VF1 is open)"
echo 0 > $SYS/$PF/sriov_numvfs &
writer=$!
wait_gone $writer 20 || { cat /tmp/hold.out; fail "the host is still blocked in sriov_numvfs=0 after 20 s"; }
wait $holder; rc=$?
cat /tmp/hold.out
[ $rc = 0 ] || fail "hold exited $rc"
grep -q "$VF1: the host asked for the device back; releasing" /tmp/hold.out || fail "no release on request"
[ "$(numvfs)" = 0 ] || fail "sriov_numvfs is $(numvfs)"
echo "vfio: ok"
