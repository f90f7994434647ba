# linux-restart: a Linux guest of the toolstack (`splitvmm up --stay`, `kind = "linux"`, 1 vCPU,
# 160 MiB, `share = "all-ram"`) with a disk and a network interface on virtio-pci served by the
# managed driver domain keeps both through a `kill -9` of the driver domain. The guest writes
# 256 KiB with O_DIRECT in a loop, over 96 slots (l2.writer=1 in tests/lab/guest-init) and pings the lab
# VM through the switch's tap uplink; the driver domain is stopped (SIGSTOP) until the
# in-flight log its guest's VMM holds (read from the lab VM through /proc) marks a request in
# flight, and killed there (SIGKILL); the toolstack restarts it; the guest's VMM resumes each
# device on the new backend (the disk's in-flight log handed back, its rings at the used
# index); the writes go on within 5 s of the kill (read from the image by the lab VM), the
# guest's writer and kernel log show no I/O error, the ping to the lab VM works again, and
# the last write the guest saw complete in each slot is in the image file, read from the lab
# VM (never the guest's word on contents).
W=/tmp/linux-restart
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
SV="/bin/splitvmm --run-dir $W/run"
BASE="console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check"
P=$LAB_PATTERN-r

step "splitvmm up --stay: guest 'writer' with a disk and a NIC"
truncate -s 32M $W/writer.img
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[driver_domain]
name = "driver"
domid = 1
uplink = "svtap0"
[[guest]]
name = "writer"
domid = 2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$BASE l2.pattern=$P l2.writer=1 l2.peer=10.0.0.1 l2.shell=1"
memory = 160
vcpus = 1
share = "all-ram"
[[guest.disk]]
image = "$W/writer.img"
[[guest.nic]]
TOML
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
LOG=$W/run/logs/writer.log
# The lab VM is 10.0.0.1 on the switch's uplink, which the toolstack creates.
i=0
until [ -e /sys/class/net/svtap0 ]; do
    [ $i -ge 300 ] && { cat $W/up.log; fail "no uplink tap svtap0 within 30 s"; }
    sleep 0.1
    i=$((i + 1))
done
ip addr add 10.0.0.1/24 dev svtap0
ip link set svtap0 up
# wait_log PATTERN SECONDS: waits for a line of the guest's log.
wait_log() {
    i=0
    until grep -q "$1" "$LOG" 2>/dev/null; do
        kill -0 $up 2>/dev/null || { cat $W/up.log; fail "splitvmm up ended early"; }
        if [ $i -ge $(($2 * 10)) ]; then
            tail -15 "$LOG"
            fail "no '$1' in the guest's log within $2 s"
        fi
        sleep 0.1
        i=$((i + 1))
    done
}
# guest_sh COMMAND: types COMMAND on the guest's console (its /init runs it) and waits up to
# 60 s for its end; fails unless it exits 0. Its output lines are in $GOUT.
guest_sh() {
    before=$(grep -c "L2-RAN [a-z]" "$LOG")
    echo "+ [writer] $1"
    (
        printf '%s\n' "$1"
        i=0
        while [ "$(grep -c "L2-RAN [a-z]" "$LOG")" -le "$before" ] && [ $i -lt 600 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        printf '\035'
    ) | $SV console writer > /dev/null 2>&1
    [ "$(grep -c "L2-RAN [a-z]" "$LOG")" -gt "$before" ] || fail "'$1' did not finish within 60 s"
    GOUT=$(tr -d '\r' < "$LOG" | awk -v n="$before" '/L2-RAN [a-z]/ { r++; next } r == n && /^L2-OUT / { sub(/^L2-OUT /, ""); print }')
    [ -n "$GOUT" ] && echo "$GOUT" | sed 's/^/  | /'
    ran=$(grep -o "L2-RAN [a-z]*" "$LOG" | sed -n "$((before + 1))p")
    [ "$ran" = "L2-RAN ok" ] || fail "'$1' failed"
}
# block_is I: whether write I is in the image, read from here (slot 32 + I % 96 of 256 KiB
# starts with the writer's pattern for I).
block_is() {
    want="$P-w$1"
    [ "$(dd if=$W/writer.img bs=4096 skip=$(((32 + $1 % 96) * 64)) count=1 2>/dev/null | head -c ${#want})" = "$want" ]
}
# written_from I: the first block from I on that the writer has not written yet (it writes
# them in order: 32 at a stride first, then one by one).
written_from() {
    i=$1
    while block_is $((i + 32)); do i=$((i + 32)); done
    while block_is $i; do i=$((i + 1)); done
    echo $i
}
wait_log "L2-SHELL-READY" 120
grep -q "^L2-WRITER started" $LOG || fail "the guest's writer did not start"
grep -q "^L2-PING-OK 10.0.0.1" $LOG || fail "the guest got no answer from the lab VM through the uplink"
grep -E "^L2-|virtio-(blk|net) \(virtio-pci\)|in-flight" $LOG | head -20

step "kill -9 the driver domain while the guest writes"
# Mid-I/O: the writer has been going for a while and still goes.
n0=$(written_from 1)
sleep 1
n1=$(written_from $n0)
echo "the writer is at write $n1 ($((n1 - n0)) in the last second)"
[ $n1 -gt $n0 ] || fail "the writer made no progress before the kill"
dd=$(for d in /proc/[0-9]*; do [ "$(cut -d' ' -f2,4 $d/stat 2>/dev/null)" = "(driver-domain) $up" ] && echo ${d#/proc/}; done | head -1)
[ -n "$dd" ] || fail "no driver domain under splitvmm up ($up)"
vmm=$(for d in /proc/[0-9]*; do [ "$(cut -d' ' -f2,4 $d/stat 2>/dev/null)" = "(splitvmm-vmm) $up" ] && echo ${d#/proc/}; done | head -1)
[ -n "$vmm" ] || fail "no splitvmm-vmm under splitvmm up ($up)"
# The in-flight log is the guest's VMM's to keep: a memfd among its descriptors.
log_fd=$(ls -l /proc/$vmm/fd | grep "splitvmm-blk-inflight" | sed 's/.* \([0-9]*\) -> .*/\1/' | head -1)
[ -n "$log_fd" ] || { ls -l /proc/$vmm/fd; fail "the guest's VMM holds no in-flight log"; }
# in_flight: requests the log marks in flight (queue 0: a 16-byte header, then 16 bytes per
# descriptor, the first of which is 1 while the request is in flight).
in_flight() {
    od -An -v -tu1 -j16 -N4096 /proc/$vmm/fd/$log_fd | awk '$1 == 1' | wc -l
}
# Stop the driver domain until its log marks a request in flight, then kill it there. Between
# tries the lab VM follows the writer in the image (a dd per block: keep the scans short).
caught=0
tries=0
pos=$n1
while [ $tries -lt 200 ]; do
    tries=$((tries + 1))
    kill -STOP $dd
    while [ "$(cut -d' ' -f3 /proc/$dd/stat)" != T ]; do :; done
    caught=$(in_flight)
    [ "$caught" -gt 0 ] && break
    kill -CONT $dd
    if [ $((tries % 5)) = 0 ]; then pos=$(written_from $pos); else sleep 0.0$((tries % 7 + 1)); fi
done
[ "$caught" -gt 0 ] || fail "no try of $tries found a request in flight"
t0=$(cut -d' ' -f1 /proc/uptime)
kill -9 $dd
at_kill=$(written_from $pos)
echo "killed the driver domain (pid $dd) at ${t0} s with $caught request(s) in flight (try $tries), the writer at write $at_kill"

step "the toolstack restarts it; the guest's writes go on within 5 s of the kill"
i=0
until grep -q "driver: restarted (pid" $W/up.log; do
    [ $i -ge 100 ] && { tail -20 $W/up.log; fail "the driver domain was not restarted within 10 s"; }
    sleep 0.1
    i=$((i + 1))
done
grep -E "driver: (died|restarted)" $W/up.log
# Resumed once a write the guest issued after the restart is in the image: the block after
# the one that may have been in flight at the kill (one dd per look: the timing stays fine).
resumed=
while :; do
    block_is $((at_kill + 1))
    found=$?
    now=$(cut -d' ' -f1 /proc/uptime)
    if [ $found = 0 ]; then
        resumed=$now
        break
    fi
    awk -v a=$t0 -v b=$now 'BEGIN { exit !(b - a > 5) }' && break
    sleep 0.1
done
grep -E "vbd|vif|resumed|in-flight|backend gone" $LOG | grep -v "^L2-" | tail -8
[ -n "$resumed" ] || { tail -20 $LOG; fail "the writer did not get past write $at_kill within 5 s of the kill"; }
n=$((at_kill + 1))
# The write the guest had issued when the driver domain died (resubmitted if it was the one in
# flight) is in the image: the writer issues the next one only once it completed.
block_is $at_kill || fail "write $at_kill, issued before the kill, is not in the image"
took=$(awk -v a=$t0 -v b=$resumed 'BEGIN { printf "%.1f", b - a }')
echo "writes resumed: write $n in the image $took s after the kill"
awk -v t=$took 'BEGIN { exit !(t <= 5) }' || fail "the writes resumed $took s after the kill, not within 5 s"
grep -q "blk [0-9]*: resumed on the restarted backend (in-flight log handed back)" $LOG ||
    fail "the guest's VMM did not resume the disk with its in-flight log"
grep -q "net [0-9]*: resumed on the restarted backend" $LOG || fail "the guest's VMM did not resume the NIC"
grep -E "in-flight log taken over|resubmitting" $W/run/logs/driver.log | tail -3
grep -q "in-flight log taken over" $W/run/logs/driver.log || fail "the new driver domain did not take the log over"

step "stop the writer: no write failed, no I/O error in the guest's kernel log"
guest_sh "touch /tmp/stop-writer; i=0; while [ ! -e /tmp/writer.done ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done; cat /tmp/writer.done"
echo "$GOUT" | grep -q "^L2-WRITER acked [0-9]" || fail "the writer did not finish cleanly: $GOUT"
acked=$(echo "$GOUT" | sed -n 's/^L2-WRITER acked \([0-9]*\).*/\1/p')
grep -q "L2-WRITE-FAILED" $LOG && fail "a write failed in the guest"
guest_sh "dmesg | grep -iE 'I/O error|blk_update|critical|virtio.*(error|broken)|Buffer I/O' || true"
[ -z "$GOUT" ] || fail "the guest's kernel logged I/O errors"
guest_sh "ls /sys/class/net; ls /dev | grep '^vd'"
echo "$GOUT" | grep -qx "eth0" || fail "the guest lost its NIC"
echo "$GOUT" | grep -qx "vda" || fail "the guest lost its disk"
guest_sh "i=0; until ping -c 1 -W 2 10.0.0.1; do i=\$((i + 1)); [ \$i -ge 10 ] && exit 1; done"
echo "$GOUT" | grep -q "1 packets received" || fail "the ping from the guest to the lab VM did not resume"
[ $acked -gt $at_kill ] || fail "the writer acknowledged $acked writes, not more than the $at_kill before the kill"

step "the last write the guest saw complete in each slot is in the image (read from the lab VM)"
bad=0
i=$((acked > 96 ? acked - 95 : 1))
checked=0
while [ $i -le $acked ]; do
    block_is $i || { echo "slot $((32 + i % 96)) does not hold '$P-w$i'"; bad=$((bad + 1)); }
    checked=$((checked + 1))
    i=$((i + 1))
done
[ $bad = 0 ] || fail "$bad of the last $checked acknowledged writes are missing from the image"
echo "the last $checked of $acked acknowledged writes are in the image ($at_kill before the kill; earlier ones were overwritten by later ones)"
run $SV list
echo "$OUT" | grep -E "writer|driver"

step "the guest is destroyed, the host stopped: no process is left"
run $SV destroy writer
kill $up
wait_gone $up 15 || fail "splitvmm up outlived its SIGTERM by 15 s"
i=0
while left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain'); [ -n "$left" ]; do
    [ $i -ge 30 ] && fail "processes left after 3 s: $left"
    sleep 0.1
    i=$((i + 1))
done
echo "a Linux guest kept its disk and NIC through a driver-domain restart; nothing it wrote was lost"
