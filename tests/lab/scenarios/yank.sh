# yank: the host sets sriov_numvfs=0 while the driver domain holds both VFs open. The device
# request interrupt makes it release each VF as the kernel asks; the other VF keeps being served
# in between, and the host's write completes instead of blocking forever.
vfs_up
run $DD hw bind $VF1 vfio-pci
run $DD hw bind $VF2 vfio-pci
$DD hw hold $VF1 $VF2 --timeout 40 > /tmp/hold.out 2>&1 &
holder=$!
background $holder
i=0
until grep -q '^HOLDING 2' /tmp/hold.out; do
    kill -0 $holder 2>/dev/null || { cat /tmp/hold.out; fail "hold exited early"; }
    [ $i -ge 200 ] && { cat /tmp/hold.out; fail "hold did not take both devices within 20 s"; }
    sleep 0.1; i=$((i + 1))
done
t0=$(cut -d' ' -f1 /proc/uptime)
echo "+ echo 0 > $SYS/$PF/sriov_numvfs   (while both VFs are open)"
echo 0 > $SYS/$PF/sriov_numvfs &
writer=$!
wait_gone $writer 30 || { cat /tmp/hold.out; fail "the host is still blocked in sriov_numvfs=0 after 30 s"; }
echo "the host's write returned after $(awk -v a=$t0 -v b=$(cut -d' ' -f1 /proc/uptime) 'BEGIN { printf "%.1f", b - a }') s"
wait $holder; rc=$?
cat /tmp/hold.out
[ $rc = 0 ] || fail "hold exited $rc"
grep -q "panicked" /tmp/hold.out && fail "the driver domain panicked"
n=$(grep -c "the host asked for the device back; releasing" /tmp/hold.out)
[ "$n" = 2 ] || fail "$n releases on request, expected 2"
grep -q "still served after .* left: Identify by interrupt ok" /tmp/hold.out || fail "the remaining VF was not served after the first release"
[ "$(numvfs)" = 0 ] || fail "sriov_numvfs is $(numvfs)"
echo "yank: ok"
