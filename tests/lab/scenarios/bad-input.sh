# bad-input: wrong requests fail with a precise message and exit code, never a panic or a hang,
# and leave the devices usable.
step "addresses"
expect_fail 3 "no PCI function 0000:07:00.0" $DD hw bind 0000:07:00.0 vfio-pci
expect_fail 4 "malformed PCI address" $DD hw vfio-probe 00:02.9z
expect_fail 3 "no driver \"no-such-driver\" is loaded" $DD hw bind $PF no-such-driver

step "SR-IOV requests the PF cannot honour"
expect_fail 4 "$PF supports at most 2 VFs, 3 requested" $DD hw sriov $PF 3
expect_fail 4 "0000:00:05.1 is not an SR-IOV physical function" $DD hw sriov 0000:00:05.1 1
[ "$(numvfs)" = 0 ] || fail "a refused request changed sriov_numvfs to $(numvfs)"

step "wrong driver for the operation"
expect_fail 4 "$PF is bound to nvme, not vfio-pci" $DD hw vfio-probe $PF

step "a PF whose driver refuses: vfio-pci will not take a PF with VFs enabled"
vfs_up
expect_fail 5 "vfio-pci refused to bind: a PF with SR-IOV enabled (2 VFs) cannot be bound to vfio-pci" $DD hw bind $PF vfio-pci
[ "$(driver_of $PF)" = nvme ] || fail "$PF was not given back to nvme (driver: $(driver_of $PF))"
# The nvme driver's probe resets the PF, which takes the secondary controllers offline: a VF is
# usable again only after the Virtualization Management sequence.
vfs_up

step "a device in an IOMMU group that is not viable (0000:00:05.0 is on the serial driver)"
echo "group of 0000:00:05.1: $(ls /sys/kernel/iommu_groups/$(group_of 0000:00:05.1)/devices | tr '\n' ' ')"
run $DD hw bind 0000:00:05.1 vfio-pci
expect_fail 5 "is not viable: 0000:00:05.0 is bound to serial" $DD hw vfio-probe 0000:00:05.1
run $DD hw unbind 0000:00:05.1

step "waiting for a host request that never comes is bounded"
run $DD hw bind $VF2 vfio-pci
expect_fail 6 "the host did not ask for $VF2" $DD hw hold $VF2 --timeout 1

step "the devices still work after all that"
run $DD hw vfio-probe $VF2 --expect "$LAB_PATTERN"
vfs_down
echo "bad-input: ok"
