# linux-bench (a benchmark, not in the default order): exits per request of a Linux guest's
# virtio-blk disk. The L2 guest (1 vCPU, 256 MiB) runs tests/lab/l2-bench, 4 KiB O_DIRECT random
# reads and writes through io_uring at queue depth 1 and 32, each round an I/O phase and an idle
# baseline of the same length marked on the phase register. Three boots: interrupts without
# notification suppression (EVENT_IDX hidden), EVENT_IDX, and EVENT_IDX with the backend
# polling. The VMM snapshots its counters, KVM's binary stats and the L1 kernel's kvm_exit
# histogram by exit reason at each mark; this prints one line per round with the net (I/O
# minus idle) figures per request. Numbers are counts; times only say how slow nested TCG is.
W=/tmp/linux-bench
rm -rf $W
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -x /lab/linux/bzImage ] || [ -f /lab/linux/bzImage ] || fail "the guest kernel was not packed"
ROUNDS=1x400,32x1600
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null || fail "no tracefs"
[ -d $T/events/kvm/kvm_exit ] || fail "no kvm_exit tracepoint in the lab kernel"
echo 'hist:keys=exit_reason:size=256' > $T/events/kvm/kvm_exit/trigger ||
    fail "cannot set a histogram trigger on kvm_exit"
HIST=$T/events/kvm/kvm_exit/hist
truncate -s 64M $W/disk.img

# bench MODE VMM-FLAGS BACKEND-FLAGS
bench() {
    step "$1: l2.bench=$ROUNDS"
    rm -f $W/blk.sock
    $DD serve --blk $W/disk.img --socket $W/blk.sock $3 > $W/dd-$1.log 2>&1 &
    dd_pid=$!
    background $dd_pid
    echo "+ splitvmm-vmm --linux --vcpus 1 --mem-mib 256 --blk-socket S --share-all-ram --exit-reason-hist $HIST $2"
    RUST_LOG=warn timeout 170 /bin/splitvmm-vmm --linux --kernel /lab/linux/bzImage \
        --initrd /lab/linux/initrd.gz --vcpus 1 --mem-mib 256 --blk-socket $W/blk.sock \
        --share-all-ram --exit-reason-hist $HIST $2 \
        --cmdline "console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check l2.bench=$ROUNDS" \
        > $W/console-$1.log 2> $W/vmm-$1.log
    rc=$?
    kill $dd_pid
    wait_gone $dd_pid 5
    grep -E "^BENCH|L2-WARN|l2-bench" $W/console-$1.log
    [ "$rc" = 0 ] || { tail -20 $W/vmm-$1.log; fail "$1: splitvmm-vmm exited $rc"; }
    n=$(grep -c "^BENCH" $W/console-$1.log)
    [ "$n" = "$(echo "$ROUNDS" | tr , '\n' | wc -l)" ] || fail "$1: $n rounds ran"
    # One line per round: per request, net of the idle baseline.
    tr -d '\r' < $W/console-$1.log | grep "^BENCH" > $W/bench-$1.txt
    awk -v mode="$1" '
        FNR == NR { split($0, f, /[ =]/); qd[FNR] = f[3]; req[FNR] = f[5]; iops[FNR] = f[9]; dirq[FNR] = f[11]; next }
        /^round [0-9]+ / { net[$2, $3] = $6; io[$2, $3] = $4; idle[$2, $3] = $5 }
        END {
            for (r = 1; r in qd; r++) {
                n = req[r]
                exits = net[r, "kvm.exits"]
                npf = net[r, "exit.npf"]; ioio = net[r, "exit.ioio"]; hlt = net[r, "exit.hlt"]
                vintr = net[r, "exit.vintr"]; msr = net[r, "exit.msr"]; intr = net[r, "exit.intr"]
                other = exits - npf - ioio - hlt - vintr - msr
                notify = npf - net[r, "kvm.mmio_exits"]
                share = io[r, "kvm.exits"] ? idle[r, "kvm.exits"] / io[r, "kvm.exits"] : 0
                printf "BENCH-ROW %s qd=%d req/s=%.1f exits=%.2f mmio=%.3f notify=%.3f pio=%.3f hlt=%.3f irqwin=%.3f msr=%.3f other=%.3f (host-intr=%.3f) disk-irqs=%.3f injected=%.3f idle-share=%.2f\n",
                    mode, qd[r], iops[r], exits / n, npf / n, notify / n, ioio / n, hlt / n, vintr / n, msr / n, other / n, intr / n,
                    dirq[r] / n, net[r, "kvm.irq_injections"] / n, share
            }
        }' $W/bench-$1.txt $W/vmm-$1.log | tee -a $W/rows.txt
    grep -q "^BENCH-ROW $1 " $W/rows.txt || fail "$1: no figures"
}

bench interrupts "--no-event-idx" ""
bench event-idx "" ""
bench polling "" "--poll-us 1000000"
echo 'hist:keys=exit_reason:size=256' | sed 's/^/!/' > $T/events/kvm/kvm_exit/trigger
echo "--- exits per request, net of the idle baseline:"
cat $W/rows.txt
