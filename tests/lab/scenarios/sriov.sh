# sriov: the driver domain creates 2 VFs on the NVMe PF (Virtualization Management through the
# admin passthrough ioctl), each in its own IOMMU group, binds them to vfio-pci, reports them,
# hands one to the kernel nvme driver (its namespace shows this run's pattern) and back, and
# tears them down again.
step "the PF before"
run $DD hw list
[ "$(driver_of $PF)" = nvme ] || fail "$PF is bound to $(driver_of $PF), expected nvme"
[ "$(numvfs)" = 0 ] || vfs_down

step "enable 2 VFs with the NVMe virtualization management sequence"
run $DD hw sriov $PF 2
says "released the primary's flexible Vq resources: ok"
says "released the primary's flexible Vi resources: ok"
says "function reset of $PF"
says "VF 1): assigned 2 VQ + 1 VI, online: ok"
says "VF 2): assigned 2 VQ + 1 VI, online: ok"
[ "$(numvfs)" = 2 ] || fail "sriov_numvfs is $(numvfs)"
g1=$(group_of $VF1) g2=$(group_of $VF2) gp=$(group_of $PF)
echo "IOMMU groups: PF $gp, VF1 $g1, VF2 $g2"
[ -n "$g1" ] && [ -n "$g2" ] || fail "a VF has no IOMMU group"
[ "$g1" != "$g2" ] && [ "$g1" != "$gp" ] && [ "$g2" != "$gp" ] || fail "VFs do not have IOMMU groups of their own"
for g in $g1 $g2; do
    n=$(ls /sys/kernel/iommu_groups/$g/devices | wc -l)
    [ "$n" = 1 ] || fail "IOMMU group $g has $n devices"
done

step "bind both VFs to vfio-pci"
for vf in $VF1 $VF2; do
    [ "$(driver_of $vf)" = none ] || fail "$vf was probed by $(driver_of $vf) although autoprobe is off"
    run $DD hw bind $vf vfio-pci
    [ "$(driver_of $vf)" = vfio-pci ] || fail "$vf is bound to $(driver_of $vf)"
    [ -c /dev/vfio/$(group_of $vf) ] || fail "no /dev/vfio/$(group_of $vf)"
done
run $DD hw list
echo "$OUT" | grep "^$VF1 .* vfio-pci .* $PF\$" || fail "hw list does not report $VF1 on vfio-pci with its PF"
echo "$OUT" | grep "^$PF .* nvme .* 2/2 " || fail "hw list does not report 2/2 VFs on $PF"

step "hand VF1 to the kernel nvme driver and back to vfio-pci"
run $DD hw bind $VF1 nvme
ctrl=$(ls $SYS/$VF1/nvme 2>/dev/null | head -1)
[ -n "$ctrl" ] || fail "no nvme controller on $VF1 after binding nvme"
i=0
until [ -b /dev/${ctrl}n1 ]; do
    [ $i -ge 100 ] && fail "no /dev/${ctrl}n1 within 10 s"
    sleep 0.1; i=$((i + 1))
done
got=$(head -c ${#LAB_PATTERN} /dev/${ctrl}n1)
echo "block 0 of /dev/${ctrl}n1 (through $VF1, kernel driver): $got"
[ "$got" = "$LAB_PATTERN" ] || fail "/dev/${ctrl}n1 starts with '$got', expected '$LAB_PATTERN'"
run $DD hw bind $VF1 vfio-pci
[ "$(driver_of $VF1)" = vfio-pci ] || fail "$VF1 is bound to $(driver_of $VF1)"

step "tear down"
vfs_down
[ ! -e $SYS/$VF1 ] && [ ! -e $SYS/$VF2 ] || fail "VFs still present after sriov_numvfs=0"
echo "sriov: ok"
