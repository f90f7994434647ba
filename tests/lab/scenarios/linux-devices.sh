# linux-devices: two Linux guests of the toolstack (`splitvmm up --stay`), each with a disk and
# a network interface on virtio-pci (MSI-X per queue) served by the driver domain, every domain
# confined: the guests
# ping each other through the driver domain's switch (their addresses come from the host file,
# on the kernel command line), write this run's pattern to their disks (checked in the image
# files by the lab VM). Both NICs negotiate checksum offload, TSO and the control queue (served
# by the driver domain: left's promiscuous mode reaches it), and a 4 MiB TCP stream
# (busybox nc) goes from left to right as TSO frames through the switch, checked by md5. Then PCI hotplug (ACPI, acpiphp in the guest): a second disk is
# hot-added to a running guest (a new PCI function appears, the guest reads what the lab VM
# wrote and writes what the lab VM then finds in the image) and hot-removed (the guest ejects
# it); the NIC is detached and re-attached and the ping resumes. A guest that never ejects
# (right runs without acpiphp) loses its NIC by force after its 3 s eject_timeout, logged.
# left powers off on `splitvmm shutdown`; right, whose kernel still drives a NIC that vanished
# under it (its poweroff then hangs in the guest), is destroyed. The guests run commands typed on their consoles (`splitvmm console`).
W=/tmp/linux-devices
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
SV="/bin/splitvmm --run-dir $W/run"
BASE="console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check"

step "splitvmm up --stay: guests left (10.0.0.2) and right (10.0.0.3), each with a disk and a NIC"
truncate -s 16M $W/left.img $W/right.img
guest() { # guest NAME DOMID PEER [EXTRA-ARGS [KEYS]]
    cat <<TOML
[[guest]]
name = "$1"
domid = $2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$BASE l2.pattern=$LAB_PATTERN-$1 l2.peer=$3 l2.shell=1 l2.button=1 $4"
$5
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
    guest right 3 10.0.0.2 acpiphp.disable=1 "eject_timeout = 3"
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
# guest_sh NAME COMMAND: types COMMAND on NAME's console (its /init runs it) and waits up to
# 60 s for its end; fails unless it exits 0. Its output lines are in $GOUT.
guest_sh() {
    log=$W/run/logs/$1.log
    before=$(grep -c "L2-RAN [a-z]" "$log")
    echo "+ [$1] $2"
    (
        printf '%s\n' "$2"
        i=0
        while [ "$(grep -c "L2-RAN [a-z]" "$log")" -le "$before" ] && [ $i -lt 600 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        printf '\035'
    ) | $SV console "$1" > /dev/null 2>&1
    [ "$(grep -c "L2-RAN [a-z]" "$log")" -gt "$before" ] || fail "[$1] '$2' did not finish within 60 s"
    # The output of the last command: the L2-OUT lines after the previous L2-RAN.
    GOUT=$(tr -d '\r' < "$log" | awk -v n="$before" '/L2-RAN [a-z]/ { r++; next } r == n && /^L2-OUT / { sub(/^L2-OUT /, ""); print }')
    [ -n "$GOUT" ] && echo "$GOUT" | sed 's/^/  | /'
    # (The VMM's log shares the file: a log line may land next to a guest line.)
    ran=$(grep -o "L2-RAN [a-z]*" "$log" | sed -n "$((before + 1))p")
    [ "$ran" = "L2-RAN ok" ] || fail "[$1] '$2' failed"
}
wait_log left "L2-SHELL-READY" 120
wait_log right "L2-SHELL-READY" 60
grep -E "vbd .*Connected|vif .*Connected" $W/up.log
for g in left right; do
    echo "--- $g:"
    grep -E "^L2-|virtio-(blk|net) \(virtio-pci\)|Kernel panic|BUG|WARNING" $W/run/logs/$g.log | head -20
done
step "the driver domain and both guests' VMMs are confined"
assert_confined $up

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

step "both NICs negotiated checksum offload, TSO and the control queue; a 4 MiB TCP stream left -> right goes through the switch as TSO frames"
# Four commands on the consoles (each costs a few seconds): the listener, the file, the stream,
# the check. Each prints the virtio device's negotiated feature bits (bit 0 first: CSUM 0,
# GUEST_CSUM 1, GUEST_TSO4 7, GUEST_TSO6 8, GUEST_ECN 9, HOST_TSO4 11, HOST_TSO6 12, HOST_ECN 13,
# CTRL_VQ 17, CTRL_RX 18) or eth0's counters.
features_ok() { # NAME: the feature bits in $GOUT
    bits=$(echo "$GOUT" | grep -E '^[01]{64}$' | head -1)
    for b in 0 1 7 8 9 11 12 13 17 18; do
        [ "$(echo "$bits" | cut -c$((b + 1)))" = 1 ] || fail "$1: virtio-net feature bit $b not negotiated ($bits)"
    done
}
nstat() { echo "$GOUT" | grep "^$1 " | cut -d' ' -f2; }
counters='for s in tx_packets tx_bytes rx_packets rx_bytes; do echo "$s $(cat /sys/class/net/eth0/statistics/$s)"; done'
# busybox nc ends when its stdin does: the listener's stdin is a pipe that stays open.
guest_sh right "cat /sys/class/net/eth0/device/features; rm -f /tmp/rx; sleep 300 | nc -l -p 5001 > /tmp/rx 2>/dev/null & $counters"
features_ok right
rx0_p=$(nstat rx_packets); rx0_b=$(nstat rx_bytes)
guest_sh left "cat /sys/class/net/eth0/device/features; ip link set eth0 promisc on && dd if=/dev/urandom of=/tmp/tx bs=65536 count=64 2>/dev/null && md5sum /tmp/tx && $counters"
features_ok left
sum=$(echo "$GOUT" | grep ' /tmp/tx$' | cut -d' ' -f1)
[ -n "$sum" ] || fail "left: no md5sum of the 4 MiB file"
tx0_p=$(nstat tx_packets); tx0_b=$(nstat tx_bytes)
t0=$(cut -d' ' -f1 /proc/uptime)
guest_sh left "nc 10.0.0.3 5001 < /tmp/tx && $counters"
tx_p=$(($(nstat tx_packets) - tx0_p)); tx_b=$(($(nstat tx_bytes) - tx0_b))
guest_sh right "i=0; while [ \$(wc -c < /tmp/rx) -lt 4194304 ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done; wc -c < /tmp/rx; md5sum /tmp/rx; $counters"
took=$(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }')
echo "$GOUT" | grep -qx "4194304" || fail "right did not receive 4 MiB"
echo "$GOUT" | grep -q "^$sum " || fail "right's copy differs from left's file (md5 $sum)"
echo "4 MiB from left to right in $took s (two console round trips included), md5 $sum on both sides"
rx_p=$(($(nstat rx_packets) - rx0_p)); rx_b=$(($(nstat rx_bytes) - rx0_b))
echo "left sent $tx_b bytes in $tx_p frames, right received $rx_b bytes in $rx_p frames"
# Linux drives the control queue, which the driver domain serves (the VMM only passes it on):
# the receive mode and MAC table at ifup, and promiscuous mode switched on in left above.
grep -E "control queue 2: (promiscuous on|MAC table)" $W/run/logs/driver.log
grep -q "net vif2.0: control queue 2: promiscuous on" $W/run/logs/driver.log || fail "the driver domain did not see left's promiscuous mode on its control queue"
grep -q "net vif3.0: control queue 2: MAC table of" $W/run/logs/driver.log || fail "no MAC table set on right's control queue"
grep "control queue .*refused" $W/run/logs/driver.log && fail "the driver domain refused a Linux guest's control command"
# Without TSO no frame exceeds 1514 bytes; with it most carry several segments.
[ $tx_p -gt 0 ] && [ $((tx_b / tx_p)) -gt 1514 ] || fail "left's frames average $((tx_b / (tx_p + 1))) bytes: no TSO"
[ $rx_p -gt 0 ] && [ $((rx_b / rx_p)) -gt 1514 ] || fail "right's frames average $((rx_b / (rx_p + 1))) bytes: TSO frames were not handed on whole"

step "hot-add a second disk to left: a new PCI function appears; the guest reads and writes it"
HOT=$LAB_PATTERN-hot
truncate -s 8M $W/hot.img
printf '%s' "$HOT-from-host" | dd of=$W/hot.img bs=512 seek=2 conv=notrunc status=none
guest_sh left "ls /sys/bus/pci/devices"
echo "$GOUT" | grep -q "0000:00:03.0" && fail "left has a function at 00:03.0 before the hot-add"
run $SV block-attach left $W/hot.img --devid xvdb
says "vbd xvdb attached"
guest_sh left "i=0; while [ ! -b /dev/vdb ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done; cat /sys/bus/pci/devices/0000:00:03.0/device /sys/block/vdb/size"
echo "$GOUT" | grep -q "^0x1042" || fail "no virtio-blk function at 00:03.0 in left"
echo "$GOUT" | grep -q "^16384" || fail "left's vdb is not 8 MiB (16384 sectors)"
guest_sh left "dd if=/dev/vdb bs=512 skip=2 count=1 2>/dev/null | head -c ${#HOT}; echo; printf '%s' '$HOT-from-guest' | dd of=/dev/vdb bs=512 seek=4 conv=sync,fsync 2>/dev/null"
echo "$GOUT" | grep -q "^$HOT" || fail "left did not read the lab VM's pattern from the hot-added disk"
got=$(dd if=$W/hot.img bs=512 skip=4 count=1 2>/dev/null | head -c $((${#HOT} + 11)))
echo "sector 4 of hot.img: $got"
[ "$got" = "$HOT-from-guest" ] || fail "hot.img holds '$got', expected '$HOT-from-guest'"
grep -q "hot-plugged" $W/run/logs/left.log || fail "the VMM did not log the hot-plug"

step "hot-remove it: the guest ejects the function, then the detach completes"
run $SV block-detach left xvdb
grep -q "ejected by the guest from slot 3" $W/run/logs/left.log || fail "the guest did not eject slot 3 (the detach did not wait for it)"
guest_sh left "ls /sys/bus/pci/devices; ls /dev | grep '^vd'"
echo "$GOUT" | grep -q "0000:00:03.0" && fail "00:03.0 is still in left after the detach"
echo "$GOUT" | grep -qx "vdb" && fail "/dev/vdb is still in left after the detach"
run $SV block-list left
echo "$OUT" | grep -q "xvdb" && fail "block-list still shows xvdb"

step "detach left's NIC (ejected by the guest), re-attach it, and the ping resumes"
run $SV network-detach left 0
grep -q "ejected by the guest from slot 2" $W/run/logs/left.log || fail "the guest did not eject its NIC (slot 2)"
guest_sh left "ls /sys/class/net"
echo "$GOUT" | grep -qx "eth0" && fail "eth0 is still in left after the detach"
guest_sh left "! ping -c 1 -W 1 10.0.0.3"
run $SV network-attach left
guest_sh left "i=0; while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done; ls /sys/class/net"
echo "$GOUT" | grep -qx "eth0" || fail "eth0 did not come back in left"
guest_sh left "net"
guest_sh left "i=0; until ping -c 1 -W 2 10.0.0.3; do i=\$((i + 1)); [ \$i -ge 10 ] && exit 1; done"
echo "$GOUT" | grep -q "1 packets received" || fail "the ping from left to right did not resume"

step "right never ejects (no acpiphp): its NIC is removed by force after its 3 s deadline"
t0=$(cut -d' ' -f1 /proc/uptime)
run $SV network-detach right 0
took=$(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }')
echo "the detach took $took s"
grep "removing it by force" $W/run/logs/right.log
grep -q "did not eject slot 2 within 3s; removing it by force" $W/run/logs/right.log ||
    fail "the VMM did not log removing right's NIC by force"
awk -v t="$took" 'BEGIN { exit !(t >= 3) }' || fail "the detach did not wait for the 3 s deadline"
grep -q "ejected by the guest" $W/run/logs/right.log && fail "right ejected a device although it has no acpiphp"
run $SV network-list right
echo "$OUT" | grep -q "10.0.0.3" && fail "network-list still shows right's interface"

step "left powers off on shutdown, right is destroyed; the lab VM finds each pattern in its image"
echo "+ [left] exit"
(printf 'exit\n'; sleep 1; printf '\035') | $SV console left > /dev/null 2>&1
wait_log left "L2-WAITING-BUTTON" 30
echo "+ $SV shutdown left"
if ! timeout 70 $SV shutdown left; then
    tr -d '\r' < $W/run/logs/left.log | grep -vE "unbacked GPA|unknown port" | tail -30
    fail "splitvmm shutdown left failed"
fi
grep -q "guest powered off" $W/run/logs/left.log || fail "left: the VMM did not report an ACPI power-off"
run $SV destroy right
for g in left right; do
    got=$(dd if=$W/$g.img bs=512 skip=8 count=1 2>/dev/null | head -c $((${#LAB_PATTERN} + ${#g} + 1)))
    echo "sector 8 of $g.img: $got"
    [ "$got" = "$LAB_PATTERN-$g" ] || fail "$g.img holds '$got', expected '$LAB_PATTERN-$g'"
done
left=$(ps -o pid,args | grep '[s]plitvmm-vmm')
[ -z "$left" ] || fail "splitvmm-vmm left after the shutdowns: $left"
kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
# busybox timeout's watcher notices its command is gone within a second.
i=0
while left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain'); [ -n "$left" ]; do
    [ $i -ge 30 ] && fail "processes left after 3 s: $left"
    sleep 0.1
    i=$((i + 1))
done
echo "two Linux guests pinged each other through the switch and wrote their disks"
