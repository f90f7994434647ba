# passthrough: an NVMe VF assigned to a Linux guest of splitvmm-vmm through VFIO. The guest's
# stock nvme driver binds the VF (Identify, I/O queues, MSI-X), writes this run's pattern and
# runs an I/O phase whose exits the VMM counts (printed per request: near zero, the doorbells
# are KVM memory slots and the completions KVM irqfds); after the guest is gone the lab VM
# reads the pattern back through the VF's namespace with its own kernel nvme driver. The same
# guest first misprograms the VF (read-only and hidden configuration registers, memory
# decoding and bus mastering off, BAR0 moved out of the window and back, an FLR after a burst
# of I/O, a command whose DMA targets 4 GiB, beyond its RAM, which the IOMMU refuses): it
# hurts only itself, the VMM logs and carries on, and a last write still reaches the namespace.
# Then the handover through the toolstack, every domain confined: `splitvmm up` with a host
# file whose Linux guest has `[[guest.pci]]` (VF 1 of the owned PF): the confined driver
# domain has its hardware helper (root, started by the toolstack) enable the VFs, bind VF 1 to
# vfio-pci and open its VFIO group, and passes the group through the toolstack to the guest's
# confined VMM, none of them keeping a copy (checked in /proc/<pid>/fd); the driver domain and
# the VMM are checked confined from /proc while the guest uses the VF; `splitvmm pci-list`
# shows the VF held; `splitvmm
# pci-detach` takes it from the running guest (its VMM resets and closes it), the VF is reset
# and returned, and `splitvmm create` gives it to a second guest, which finds the first guest's
# pattern on it, writes its own and powers off: the VF is returned again as the guest ends.
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
# head node is bio-based and keeps no request counters). Short nvme_core timeouts: a mistake in the
# guest's misbehaviour (l2.vfbad) costs seconds, not the defaults' 60 s per timeout.
CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS iomem=relaxed nvme_core.multipath=N nvme_core.io_timeout=5 nvme_core.admin_timeout=5 l2.pattern=$PATTERN l2.nvme=1 l2.nvme_requests=$REQUESTS l2.vfbad=1"

# read_vf_block VF BLOCK LEN: LEN bytes of 4 KiB block BLOCK of the VF's namespace, read by the
# lab VM's kernel nvme driver (the VF is bound to nvme for it, then back to vfio-pci).
read_vf_block() {
    bind_vf_nvme $1
    GOT=$(dd if=$NS bs=4096 skip=$2 count=1 iflag=direct 2>/dev/null | head -c $3)
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

step "the guest's misprogramming hurt only itself"
grep "^L2-VFBAD" $W/console.log
# The guest console's lines end in CR LF.
ro=$(grep "^L2-VFBAD-RO" $W/console.log | tr -d "\r")
set -- $ro
[ -n "$ro" ] && [ "$3 $4" = "$6 $7" ] || fail "identity or class changed under the guest's writes: $ro"
[ "$9 ${11}" = "0x00000000 0x00000000" ] || fail "the ROM BAR or the extended space is not hidden: $ro"
bar=$(grep "^L2-VFBAD-BAR" $W/console.log | tr -d "\r")
set -- $bar
[ -n "$bar" ] && [ "$5" = 0x12340004 ] && [ "$7" = "$3" ] || fail "BAR0 did not move out and back: $bar"
[ $(( $9 & 6 )) = 6 ] || fail "memory decoding or bus mastering not back on after the driver rebound: $bar"
grep -q "guest moved BAR0 from .* to 0x12340000" $W/vmm.log || fail "the VMM did not log the BAR move"
grep -q "^L2-VFBAD-FLR done" $W/console.log || fail "the guest's function-level reset failed"
cqe=$(grep "^L2-VFDMA" $W/console.log | tr -d "\r")
set -- $cqe
echo "$cqe"
[ -n "$cqe" ] && [ $(( $3 & 0x10000 )) != 0 ] || fail "the guest's Identify to 4 GiB did not complete: $cqe"
[ "$5" != 0 ] || fail "the device wrote to 4 GiB, outside the guest's RAM: $cqe"
ctl=$(grep "^L2-VFDMA-CONTROL" $W/console.log | tr -d "\r")
set -- $ctl
echo "$ctl"
[ -n "$ctl" ] && [ $(( $3 & 0x1ffff )) = $((0x11235)) ] && [ "$5" = 0 ] && [ "$7" = 0x1B36 ] ||
    fail "the same command into the guest's RAM did not complete with the controller's identity: $ctl"
grep -q "^L2-VFBAD-WRITTEN" $W/console.log || fail "the guest's last write after the FLR failed"
grep -c "MSI-X enabled" $W/vmm.log | grep -qv "^1$" || fail "MSI-X was not enabled again after the rebind"

step "the patterns, read through the VF's namespace by the lab VM after the guest is gone"
kill -0 $vmm 2>/dev/null && fail "splitvmm-vmm still runs"
read_vf_block $VF1 256 ${#PATTERN}
echo "block 256 through $VF1: $GOT"
[ "$GOT" = "$PATTERN" ] || fail "the VF's namespace holds '$GOT' at 1 MiB, expected '$PATTERN'"
read_vf_block $VF1 512 $((${#PATTERN} + 10))
echo "block 512 through $VF1: $GOT"
[ "$GOT" = "$PATTERN-after-bad" ] || fail "the VF's namespace holds '$GOT' at 2 MiB, expected '$PATTERN-after-bad'"

step "tear down the by-hand VFs"
vfs_down

step "splitvmm up: a Linux guest with [[guest.pci]] VF 1 of the owned PF"
P1=$LAB_PATTERN-vm1
P2=$LAB_PATTERN-vm2
GUEST_CMDLINE="console=ttyS0 loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS iomem=relaxed nvme_core.multipath=N l2.nvme=1 l2.nvme_requests=32"
cat > $W/host.toml <<TOML
run_dir = "$W/run"
# Confined (the default): the driver domain drives the PF through its hardware helper.
[driver_domain]
name = "driver"
domid = 1
owns = ["$PF"]
[[guest]]
name = "vm1"
domid = 2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$GUEST_CMDLINE l2.pattern=$P1 l2.button=1"
memory = 256
[[guest.pci]]
pf = "$PF"
vf = 1
TOML
SV="/bin/splitvmm --run-dir $W/run"
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
# wait_for FILE PATTERN SECONDS
wait_for() {
    i=0
    until grep -q "$2" $1 2>/dev/null; do
        kill -0 $up 2>/dev/null || { cat $W/up.log; fail "splitvmm up ended early"; }
        [ $i -ge $(($3 * 10)) ] && { cat $W/up.log; tail -5 $1; fail "no '$2' in $1 within $3 s"; }
        sleep 0.1
        i=$((i + 1))
    done
}
wait_for $W/run/logs/vm1.log "^L2-WAITING-BUTTON" 90
grep -E "VF|assigned|created|ready" $W/up.log
grep -E "^L2-" $W/run/logs/vm1.log
grep -q "^L2-NVME-WRITTEN" $W/run/logs/vm1.log || fail "vm1 did not write through its VF"
run $SV pci-list
echo "$OUT" | grep -E "^vm1 +2 +0  $VF1 +$PF +1  1$" || fail "pci-list does not show vm1 holding VF 1 ($VF1)"

step "the VMM holds the only VFIO group descriptor"
g=$(group_of $VF1)
dd_pid=$(ps -o pid,args | grep '[d]river-domain managed' | awk '{print $1}')
vmm_pid=$(ps -o pid,args | grep '[s]plitvmm-vmm --linux' | awk '{print $1}')
held() { ls -l /proc/$1/fd 2>/dev/null | grep -c "/dev/vfio/$g\$"; }
echo "/dev/vfio/$g open in: VMM $vmm_pid: $(held $vmm_pid), driver domain $dd_pid: $(held $dd_pid), toolstack $up: $(held $up)"
[ "$(held $vmm_pid)" = 1 ] || fail "the guest's VMM does not hold /dev/vfio/$g"
[ "$(held $dd_pid)" = 0 ] || fail "the driver domain kept a copy of the group"
[ "$(held $up)" = 0 ] || fail "the toolstack kept a copy of the group"
helper_pid=$(ps -o pid,args | grep '[s]plitvmm-hw-helper' | awk '{print $1}')
[ -n "$helper_pid" ] || fail "no hardware helper beside the confined driver domain"
[ "$(held $helper_pid)" = 0 ] || fail "the hardware helper kept a copy of the group"

step "the driver domain and the VMM are confined while vm1 uses the VF; the helper did the hardware work"
assert_confined $up
grep -E "EnableVfs|BindVfio" $W/run/logs/driver-hw-helper.log
grep -q "BindVfio { vf: \"$VF1\" }: done" $W/run/logs/driver-hw-helper.log ||
    fail "the hardware helper did not bind $VF1"
grep -q "EnableVfs { pf: \"$PF\", count: 2, how: Nvme" $W/run/logs/driver-hw-helper.log ||
    fail "the hardware helper did not enable the VFs the NVMe way"

step "a guest asking for the VF vm1 holds, or for a VF the PF lacks, is refused; vm1 keeps its VF"
cat > $W/vm3.toml <<TOML
name = "vm3"
domid = 4
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
memory = 256
[[pci]]
pf = "$PF"
vf = 1
TOML
# The host's check: another guest names VF 1.
expect_fail 1 "names VF 1 of $PF too" $SV create $W/vm3.toml
# The driver domain's: a VF the PF does not have (vm3's VMM was started, waits for it, and is
# destroyed again).
sed -i 's/^vf = 1$/vf = 3/' $W/vm3.toml
expect_fail 1 "no VF of $PF ($PF has no VF 3 (2 enabled))" $SV create $W/vm3.toml
grep "vm3" $W/up.log
run $SV list
echo "$OUT" | grep -q vm3 && fail "vm3 is left after its refused create"
ps -o args | grep -q "[m]anaged-domid 4" && fail "vm3's VMM is left after its refused create"
[ "$(held $vmm_pid)" = 1 ] || fail "vm1's VMM lost its VF to the refused create"
run $SV pci-list
echo "$OUT" | grep -qE "^vm1 +2 +0  $VF1" || fail "pci-list no longer shows vm1 holding $VF1"

step "splitvmm pci-detach: vm1's VMM lets the VF go while vm1 runs; the VF is reset and returned"
run $SV pci-detach vm1 0
says "vm1: PCI 0 ($VF1) detached, reset and returned"
grep -E "vm1: " $W/up.log
grep "reset at the end of the assignment" $W/run/logs/vm1.log || fail "vm1's VMM did not reset the VF"
grep "released (its descriptors closed)" $W/run/logs/vm1.log || fail "vm1's VMM did not close the VF"
kill -0 $vmm_pid 2>/dev/null || fail "vm1's VMM ended with the detach"
[ "$(held $vmm_pid)" = 0 ] || fail "vm1's VMM still holds /dev/vfio/$g after the detach"
run $SV pci-list
echo "$OUT" | grep -q "$VF1" && fail "pci-list still shows $VF1 held"
grep -q "ResetVf { vf: \"$VF1\" }: done" $W/run/logs/driver-hw-helper.log ||
    fail "the hardware helper did not reset $VF1"
run $SV shutdown vm1

step "splitvmm create: a second guest gets the same VF"
cat > $W/vm2.toml <<TOML
name = "vm2"
domid = 3
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$GUEST_CMDLINE l2.pattern=$P2"
memory = 256
[[pci]]
pf = "$PF"
vf = 1
TOML
run $SV create $W/vm2.toml
says "created vm2 (domain 3)"
wait_for $W/up.log "vm2: powered off" 90
grep -E "vm2: " $W/up.log
grep -E "^L2-NVME" $W/run/logs/vm2.log
grep -q "VF 1 of $PF ($VF1) assigned" $W/up.log || fail "vm2 was not assigned VF 1"
grep -q "^L2-NVME-BEFORE $P1" $W/run/logs/vm2.log || fail "vm2 did not find vm1's pattern on the VF"
grep -q "^L2-NVME-WRITTEN" $W/run/logs/vm2.log || fail "vm2 did not write through the VF"
wait_for $W/up.log "vm2: $VF1 reset and returned to the driver domain" 30

kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain')
[ -z "$left" ] || fail "processes left: $left"

step "vm2's pattern, read through the VF by the lab VM"
read_vf_block $VF1 256 ${#P2}
echo "block 256 through $VF1: $GOT"
[ "$GOT" = "$P2" ] || fail "the VF's namespace holds '$GOT', expected '$P2'"

step "tear down"
vfs_down
echo "passthrough: ok"
