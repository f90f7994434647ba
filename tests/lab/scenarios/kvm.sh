# kvm: the main job under real (nested) KVM: `splitvmm up` runs the tiny guest kernel as a KVM
# guest under splitvmm-vmm, next to a process guest; both reach their disks through the driver
# domain (ioeventfd kicks, irqfd interrupts), the KVM guest's disk is detached and re-attached,
# and every check passes.
W=/tmp/kvm
mkdir -p $W
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab VM"
[ -f /bin/tiny-kernel ] || fail "the tiny kernel was not packed"
cat > $W/host.toml <<TOML
run_dir = "$W/run"
[driver_domain]
name = "driver"
domid = 1
[[guest]]
name = "proc"
domid = 2
[[guest.disk]]
image = "$W/p.img"
size_mib = 2
[[guest]]
name = "tiny"
domid = 3
kind = "kvm"
kernel = "/bin/tiny-kernel"
[[guest.disk]]
image = "$W/t.img"
size_mib = 2
TOML

step "splitvmm up with a KVM guest and a process guest"
run /bin/splitvmm up --check $W/host.toml
says "tiny: vbd 51712 detached"
says "checks: 5 passed, 0 failed"
echo "$OUT" | grep "in a KVM guest" | head -2
step "the KVM guest's console"
grep -E "^(hello|disk:|per-request)" $W/run/tiny.console.log | head -6
