# owned: the host file names the NVMe PF as the driver domain's; `splitvmm up` starts the
# driver domain with it, the driver domain reports it in the store from the real sysfs, and
# `splitvmm devices` shows it with its driver, IOMMU group and SR-IOV state.
W=/tmp/owned
mkdir -p $W
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[confinement]
memory_max_mib = 64
pids_max = 300
[driver_domain]
name = "driver"
domid = 1
owns = ["$PF"]
TOML

: > $W/up.log
step "splitvmm up with $PF owned by the driver domain"
/bin/splitvmm up $W/host.toml --stay > $W/up.log 2>&1 &
up=$!
background $up
i=0
until grep -q "host is up" $W/up.log; do
    i=$((i + 1))
    [ $i -lt 300 ] || fail "splitvmm up did not come up: $(cat $W/up.log)"
    kill -0 $up 2>/dev/null || fail "splitvmm up exited: $(cat $W/up.log)"
    sleep 0.1
done

step "the driver domain is confined (the lab's root is an initramfs: MS_MOVE + chroot)"
assert_confined $up
dd=$(for d in /proc/[0-9]*; do [ "$(cut -d' ' -f2,4 $d/stat 2>/dev/null)" = "(driver-domain) $up" ] && echo ${d#/proc/}; done | head -1)
[ -n "$dd" ] || fail "no driver domain under splitvmm up ($up)"
cg=$(sed -n 's/^0:://p' /proc/$dd/cgroup)
echo "driver domain cgroup: $cg, pids.max $(cat /sys/fs/cgroup$cg/pids.max), memory.max $(cat /sys/fs/cgroup$cg/memory.max)"
[ "$cg" = "/splitvmm-$up/driver" ] || fail "the driver domain is in cgroup '$cg', not /splitvmm-$up/driver"
[ "$(cat /sys/fs/cgroup$cg/pids.max)" = 300 ] || fail "pids.max is not 300"
[ "$(cat /sys/fs/cgroup$cg/memory.max)" = $((64 << 20)) ] || fail "memory.max is not 64 MiB"

step "splitvmm devices"
run /bin/splitvmm devices --store $W/run/xenstored.sock
echo "$OUT" | grep "^driver .*$PF .*nvme .*/2  present" || fail "$PF not reported as owned, on nvme, with its VF count"

step "shut the host down"
kill $up
wait $up || true
kill -0 $up 2>/dev/null && fail "splitvmm up survived SIGTERM"
ps -o pid,args | grep "[s]plitvmm-hw-helper" && fail "the hardware helper outlived the host"
[ -d /sys/fs/cgroup/splitvmm-$up ] && fail "the toolstack left its cgroup behind"
echo "owned: reported and shut down"
