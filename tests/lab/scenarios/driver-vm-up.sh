# driver-vm-up: the driver domain as a VM, started and restarted by the toolstack (issue 21).
# `splitvmm up --stay` with `[driver_domain] kind = "vm"`: dom0's hardware helper enables the
# NVMe PF's VFs (the NVMe sequence) and binds VF 1 to vfio-pci; the toolstack boots the driver
# VM (the lab's kernel, tests/lab/driver-init, 1 vCPU, 160 MiB) under a confined splitvmm-vmm
# handed the VF's group, the driver domain's store connection and its control channel, which
# the VMM carries over COM2 to `driver-domain vm-serve --managed` in the VM: there the same
# managed driver domain as a process walks the backend half of the xenbus state machine and
# serves a Linux guest's disk (`device = "/dev/nvme0n1"`, the VF's namespace as the VM's own
# nvme driver sees it). The guest writes its pattern and then 256 KiB with O_DIRECT in a loop
# (l2.writer=1, reporting every 4 writes). The driver VM's VMM is stopped (SIGSTOP, every
# thread) until the guest's in-flight log marks a request in flight and killed there
# (SIGKILL); the toolstack's supervision boots a new driver VM, hands the device over again,
# and the guest's VMM resumes the disk with its in-flight log; the writes go on, none fails.
# After the host is stopped the lab VM reads the pattern and the last acknowledged writes back
# from the VF's namespace with its own nvme driver.
W=/tmp/driver-vm-up
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
[ -f /lab/driver/initrd.gz ] || fail "the driver VM's initramfs was not packed"
SV="/bin/splitvmm --run-dir $W/run"
P=$LAB_PATTERN-UP
DVM_EXTRA="loglevel=6 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS nvme_core.multipath=N nvme_core.io_timeout=10 nvme_core.admin_timeout=10"
GUEST_EXTRA="console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check $LAB_L2_ARGS l2.pattern=$P l2.writer=1 l2.writer_report=1 l2.button=1"
LOG=$W/run/logs/writer.log
DLOG=$W/run/logs/driver.log
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a=$1 -v b=$(uptime_s) 'BEGIN { printf "%.1f", b - a }'; }
# wait_in FILE PATTERN SECONDS: waits for PATTERN in FILE while splitvmm up runs.
wait_in() {
    i=0
    until grep -q "$2" "$1" 2>/dev/null; do
        kill -0 $up 2>/dev/null || {
            tail -20 $W/up.log; tail -20 $DLOG
            dmesg | grep -E "type=1326|seccomp" | tail -3
            fail "splitvmm up ended early"
        }
        if [ $i -ge $(($3 * 10)) ]; then
            tail -25 "$1"
            fail "no '$2' in ${1##*/} within $3 s"
        fi
        sleep 0.1
        i=$((i + 1))
    done
}
last_written() { sed -n 's/^L2-WRITER at \([0-9]*\) .*/\1/p' $LOG | tail -1; }
# child_vmm WHAT: the pid of splitvmm up's splitvmm-vmm whose arguments contain WHAT.
child_vmm() {
    for d in /proc/[0-9]*; do
        [ "$(cut -d' ' -f2,4 $d/stat 2>/dev/null)" = "(splitvmm-vmm) $up" ] || continue
        tr '\0' ' ' < $d/cmdline | grep -q -- "$1" && echo ${d#/proc/}
    done | head -1
}

step "VFs off; splitvmm up --stay with a driver VM and a Linux guest whose disk it serves"
[ "$(numvfs)" = 0 ] || vfs_down
[ "$(driver_of $PF)" = nvme ] || fail "the PF is on $(driver_of $PF), not nvme"
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[driver_domain]
name = "driver"
domid = 1
kind = "vm"
owns = ["$PF"]
[driver_domain.vm]
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/driver/initrd.gz"
memory = 160
vcpus = 1
vf = 1
shm_mib = 256
extra = "$DVM_EXTRA"
[[guest]]
name = "writer"
domid = 2
kind = "linux"
kernel = "/lab/linux/bzImage"
ramdisk = "/lab/linux/initrd.gz"
extra = "$GUEST_EXTRA"
memory = 160
vcpus = 1
share = "all-ram"
[[guest.disk]]
device = "/dev/nvme0n1"
TOML
t_up=$(uptime_s)
RUST_LOG=info /bin/splitvmm up --stay $W/host.toml > $W/up.log 2>&1 &
up=$!
background $up
wait_in $DLOG "vm-serve: ready" 150
t_dvm=$(since $t_up)
wait_in $LOG "^L2-WRITER at 8 " 150
grep -E "^DVM-|vm-serve|managed|Ready|nvme0n1" $DLOG | grep -vE "unknown port|unbacked GPA" | head -20
echo "--- splitvmm up:"
grep -vE "unknown port|unbacked GPA" $W/up.log | head -20
grep -q "^L2-DISK-WRITTEN" $LOG || fail "the guest did not write its pattern to /dev/vda"
[ "$(numvfs)" -ge 1 ] || fail "the hardware helper did not enable the PF's VFs"
[ "$(driver_of $VF1)" = vfio-pci ] || fail "VF 1 is on $(driver_of $VF1), not vfio-pci"
dvm=$(child_vmm --driver-vm-domid)
guest=$(child_vmm --managed-domid)
[ -n "$dvm" ] && [ -n "$guest" ] || fail "no driver VM ($dvm) or guest VMM ($guest) under splitvmm up"
assert_confined $up
echo "DVM-UP driver VM ready $t_dvm s after splitvmm up; the guest's writer at write $(last_written) after $(since $t_up) s"
# What each VMM maps, judged from outside (/proc/PID/maps: offset, inode and name of each
# shared file mapping): the driver VM's RAM (its VMM's memfd `splitvmm-driver-vm-ram`) is mapped
# by its own VMM only, while the guest's RAM (`splitvmm-ram`, share = "all-ram") is mapped by
# both: the driver VM sees the guest's memory dom0 mapped into its BAR2, the guest nothing of
# the driver VM.
ram_inode() { grep "memfd:$2 " /proc/$1/maps | awk '{ print $5 }' | sort -u; }
dvm_ram=$(ram_inode $dvm splitvmm-driver-vm-ram)
guest_ram=$(ram_inode $guest splitvmm-ram)
[ -n "$dvm_ram" ] && [ -n "$guest_ram" ] || fail "no RAM memfd found in the VMMs' maps (driver VM '$dvm_ram', guest '$guest_ram')"
awk '{ print $5 }' /proc/$guest/maps | grep -qx "$dvm_ram" && fail "the guest's VMM maps the driver VM's RAM (inode $dvm_ram)"
ls -l /proc/$guest/fd | grep -q "memfd:splitvmm-ram" || fail "the guest's VMM holds no RAM memfd"
for fd in /proc/$guest/fd/*; do
    [ "$(stat -L -c %i $fd 2>/dev/null)" = "$dvm_ram" ] && fail "the guest's VMM holds the driver VM's RAM ($fd)"
done
awk '{ print $5 }' /proc/$dvm/maps | grep -qx "$guest_ram" || fail "the driver VM's VMM does not map the guest's RAM (BAR2)"
echo "DVM-UP-MAPS the driver VM's RAM (inode $dvm_ram) is in no mapping or descriptor of the guest's VMM; the guest's RAM (inode $guest_ram) is mapped by the driver VM's VMM (BAR2)"

step "kill -9 the driver VM's VMM with a request in flight; the toolstack boots a new one"
log_fd=$(ls -l /proc/$guest/fd | grep "splitvmm-blk-inflight" | sed 's/.* \([0-9]*\) -> .*/\1/' | head -1)
[ -n "$log_fd" ] || { ls -l /proc/$guest/fd; fail "the guest's VMM holds no in-flight log"; }
stop_with_request_in_flight $dvm /proc/$guest/fd/$log_fd
at_kill=$(last_written)
t0=$(uptime_s)
kill -9 $dvm
echo "killed the driver VM's VMM (pid $dvm) with $CAUGHT request(s) in flight (try $TRIES), the writer at write $at_kill"
wait_in $W/up.log "driver: restarted (pid" 180
t_restarted=$(since $t0)
grep -E "driver: (died|restarted)" $W/up.log
wait_in $LOG "resumed on the restarted backend" 60
t_resumed=$(since $t0)
i=0
until [ "$(last_written)" -ge $((at_kill + 8)) ] 2>/dev/null; do
    kill -0 $up 2>/dev/null || fail "splitvmm up ended while the writes should resume"
    [ $i -ge 600 ] && fail "the writer did not get 8 writes past write $at_kill within 60 s of the resume"
    sleep 0.1; i=$((i + 1))
done
t_writes=$(since $t0)
grep -E "blk [0-9]*: " $LOG | grep -vE "unknown port|unbacked GPA" | tail -3
grep -q "resumed on the restarted backend (in-flight log handed back)" $LOG ||
    fail "the guest's disk resumed without its in-flight log"
grep -q "in-flight log taken over" $DLOG || fail "the new driver VM did not take the log over"
echo "DVM-UP-RESTART driver VM restarted by the toolstack (ready) after $t_restarted s, disk resumed after $t_resumed s, 8 writes past the kill after $t_writes s"

step "the guest shuts down (its writer reports), the host stops (the driver VM powers off)"
run $SV list
echo "$OUT" | grep -E "writer|driver"
run $SV shutdown writer
grep -E "^L2-WRITER acked|^L2-WRITE-FAILED|^L2-IOERR" $LOG
grep -q "^L2-WRITE-FAILED" $LOG && fail "a write of the guest failed"
grep -q "^L2-IOERR" $LOG && fail "the guest's kernel logged an I/O error"
ACKED=$(sed -n 's/^L2-WRITER acked \([0-9]*\).*/\1/p' $LOG | tr -d '\r' | tail -1)
[ -n "$ACKED" ] || fail "the guest's writer did not report"
[ "$ACKED" -gt $((at_kill + 8)) ] || fail "the writer acknowledged $ACKED writes, at the kill $at_kill"
kill $up
wait_gone $up 30 || fail "splitvmm up outlived its SIGTERM by 30 s"
grep -q "DVM-SERVE exited 0" $DLOG || { tail -10 $DLOG; fail "the driver VM's vm-serve did not end cleanly"; }

step "the pattern and the last writes are read back from the VF's namespace (the lab VM's nvme driver)"
bind_vf_nvme $VF1
GOT=$(dd if=$NS bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c ${#P})
[ "$GOT" = "$P" ] || fail "the namespace holds '$GOT' at sector 8, expected '$P'"
i=$((ACKED - 7))
while [ $i -le $ACKED ]; do
    want="$P-w$i"
    GOT=$(dd if=$NS bs=4096 skip=$(((32 + i % 96) * 64)) count=1 iflag=direct 2>/dev/null | head -c ${#want})
    [ "$GOT" = "$want" ] || fail "write $i is not on the namespace: '$GOT'"
    i=$((i + 1))
done
echo "the pattern and writes $((ACKED - 7))..$ACKED (the last acknowledged, after the restart) are on the namespace"
vfs_down
left=$(ps -o pid,args | grep -E '[s]plitvmm|[d]river-domain')
[ -z "$left" ] || fail "processes left: $left"
echo "driver-vm-up: ok"
