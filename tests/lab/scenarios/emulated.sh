# emulated: full emulation. `splitvmm-vmm --linux --nvme IMG,rw` gives the lab's Debian kernel
# (an L2 guest, 1 vCPU, 256 MiB) an NVMe controller emulated by the VMM: every register and
# doorbell access of the guest's stock nvme driver traps to the VMM, which walks the queues in
# guest memory, does the I/O on a file of the lab VM and raises MSI-X through KVM irqfds. The
# guest checks the driver bound it (/sys), reads block 0 (put there by the lab VM), writes
# this run's pattern at 1 MiB with O_DIRECT and runs an I/O phase whose exits the VMM counts
# (at least one MMIO exit per request: this is the approach where the VMM is on the data
# path); the lab VM then reads the pattern from the file. Then `splitvmm up` boots the guest
# with the same file as `[[guest.nvme]]` without `writable`: the confined VMM gets a read-only
# descriptor from the toolstack, the guest a read-only disk, and the file stays unchanged.
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

# The toolstack: a Linux guest whose host file gives it the same file as `[[guest.nvme]]`
# without `writable`. The toolstack opens and locks the image and hands the descriptor to the
# confined VMM: read-only, as seen in /proc from outside; the guest sees a read-only disk, its
# write fails, and the file is unchanged when the guest has powered off and been reaped.
step "splitvmm up: [[guest.nvme]] without writable gives the guest a read-only disk"
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[driver_domain]
name = "driver"
domid = 1
[[guest]]
name = "emu"
domid = 2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$CMDLINE l2.pattern=$PATTERN-RO"
memory = 256
[[guest.nvme]]
image = "$IMG"
TOML
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
GLOG=$W/run/logs/emu.log
i=0
until grep -q "^L2-NVME " $GLOG 2>/dev/null; do
    kill -0 $up 2>/dev/null || { cat $W/up.log; fail "splitvmm up ended early"; }
    [ $i -ge 1200 ] && { cat $W/up.log; tail -20 $GLOG; fail "no emulated disk in the guest within 120 s"; }
    sleep 0.1
    i=$((i + 1))
done
vmm=$(ps -o pid,args | grep '[s]plitvmm-vmm --linux' | awk '{ print $1; exit }')
[ -n "$vmm" ] || fail "no splitvmm-vmm running"
echo "VMM $vmm: $(grep -E '^(Uid|CapEff)' /proc/$vmm/status | tr -s '\t' ' ' | tr '\n' ' ')"
[ "$(awk '/^Uid:/ { print $2 }' /proc/$vmm/status)" != 0 ] || fail "the guest's VMM runs as root"
img_fd=
for f in /proc/$vmm/fd/*; do [ "$(readlink $f)" = "$IMG" ] && img_fd=${f##*/}; done
[ -n "$img_fd" ] || fail "the VMM holds no descriptor of $IMG"
flags=$(awk '/^flags:/ { print $2 }' /proc/$vmm/fdinfo/$img_fd)
echo "VMM fd $img_fd -> $IMG, flags $flags"
[ $((0$flags & 3)) = 0 ] || fail "the VMM's descriptor of the image is writable (flags $flags)"
tr '\0' ' ' < /proc/$vmm/cmdline | grep -q -- "--nvme-fd $img_fd " || fail "the VMM was not given the image as --nvme-fd $img_fd"
i=0
until grep -q "emu: powered off" $W/up.log; do
    [ $i -ge 900 ] && { tail -20 $GLOG; fail "emu was not reaped within 90 s"; }
    sleep 0.1
    i=$((i + 1))
done
grep -E "emu: " $W/up.log
grep -E "^L2-NVME|^L2-IRQ|^L2-DONE" $GLOG
grep -q "^L2-NVME-DRIVER nvme id 0x1b36:0x00f0 class 0x010802 ro 1" $GLOG || fail "the guest's disk is not a read-only emulated NVMe disk"
grep -q "^L2-NVME-BLOCK0 $BLOCK0" $GLOG || fail "the guest did not read block 0"
grep -q "^L2-NVME-WRITTEN" $GLOG && fail "the guest wrote to a read-only emulated disk"
[ "$(md5sum < $IMG)" = "$sum" ] || fail "the read-only file changed"
echo "read-only file unchanged"
kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain')
[ -z "$left" ] || fail "processes left: $left"
echo "emulated: PASS"
