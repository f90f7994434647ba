# linux-devices: two Linux guests of the toolstack (`splitvmm up --stay`), each with a disk and
# a network interface on virtio-pci (MSI-X per queue) served by the driver domain: the guests
# ping each other through the driver domain's switch (their addresses come from the host file,
# on the kernel command line), write this run's pattern to their disks (checked in the image
# files by the lab VM), and power off on `splitvmm shutdown`.
W=/tmp/linux-devices
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
SV="/bin/splitvmm --run-dir $W/run"
BASE="console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check"

step "splitvmm up --stay: guests left (10.0.0.2) and right (10.0.0.3), each with a disk and a NIC"
truncate -s 16M $W/left.img $W/right.img
guest() { # guest NAME DOMID PEER
    cat <<TOML
[[guest]]
name = "$1"
domid = $2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$BASE l2.pattern=$LAB_PATTERN-$1 l2.peer=$3 l2.button=1"
memory = 160
vcpus = 1
share = "all-ram"
[[guest.disk]]
image = "$W/$1.img"
[[guest.nic]]
TOML
}
{
    printf 'run_dir = "%s/run"\n[driver_domain]\nname = "driver"\ndomid = 1\n' $W
    guest left 2 10.0.0.3
    guest right 3 10.0.0.2
} > $W/host.toml
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
# wait_log NAME PATTERN SECONDS: waits for a line of guest NAME's log.
wait_log() {
    i=0
    until grep -q "$2" "$W/run/logs/$1.log" 2>/dev/null; do
        kill -0 $up 2>/dev/null || { cat $W/up.log; fail "splitvmm up ended early"; }
        if [ $i -ge $(($3 * 10)) ]; then
            tail -15 "$W/run/logs/$1.log"
            fail "no '$2' in $1's log within $3 s"
        fi
        sleep 0.1
        i=$((i + 1))
    done
}
wait_log left "^L2-WAITING-BUTTON" 120
wait_log right "^L2-WAITING-BUTTON" 60
grep -E "vbd .*Connected|vif .*Connected" $W/up.log
for g in left right; do
    echo "--- $g:"
    grep -E "^L2-|virtio-(blk|net) \(virtio-pci\)|Kernel panic|BUG|WARNING" $W/run/logs/$g.log | head -20
done

step "both guests reached each other through the driver domain's switch"
grep -q "^L2-NET eth0 02:00:00:00:02:00 10.0.0.2" $W/run/logs/left.log ||
    fail "left did not configure 10.0.0.2 on eth0 (MAC 02:00:00:00:02:00)"
grep -q "^L2-NET eth0 02:00:00:00:03:00 10.0.0.3" $W/run/logs/right.log || fail "right did not configure 10.0.0.3 on eth0 (MAC 02:00:00:00:03:00)"
grep -q "^L2-PING-OK 10.0.0.3" $W/run/logs/left.log || fail "left got no answer from right"
grep -q "^L2-PING-OK 10.0.0.2" $W/run/logs/right.log || fail "right got no answer from left"
for g in left right; do
    grep -qE "^L2-IRQ .*PCI-MSI.*virtio1-input.0" $W/run/logs/$g.log ||
        fail "$g: no MSI-X vector of its own for the NIC's receive queue"
    grep -qE "^L2-IRQ .*PCI-MSI.*virtio1-output.0" $W/run/logs/$g.log ||
        fail "$g: no MSI-X vector of its own for the NIC's transmit queue"
done
run $SV network-list left
echo "$OUT" | grep -q "10.0.0.2" || fail "network-list does not show left's address"

step "shutdown: both guests power off; the lab VM finds each pattern in its image"
run $SV shutdown left
run $SV shutdown right
for g in left right; do
    grep -q "guest powered off" $W/run/logs/$g.log || fail "$g: the VMM did not report an ACPI power-off"
    got=$(dd if=$W/$g.img bs=512 skip=8 count=1 2>/dev/null | head -c $((${#LAB_PATTERN} + ${#g} + 1)))
    echo "sector 8 of $g.img: $got"
    [ "$got" = "$LAB_PATTERN-$g" ] || fail "$g.img holds '$got', expected '$LAB_PATTERN-$g'"
done
left=$(ps -o pid,args | grep '[s]plitvmm-vmm')
[ -z "$left" ] || fail "splitvmm-vmm left after the shutdowns: $left"
kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain')
[ -z "$left" ] || fail "processes left: $left"
echo "two Linux guests pinged each other through the switch and wrote their disks"
