//! Bad input from a KVM guest: garbage to the virtio-mmio registers, impossible queue sizes
//! and ring addresses, unknown ports and MMIO, a triple fault. The guest gets what hardware
//! gives, the VMM logs it, and the driver domain carries on serving the next guest.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use splitvmm_tests::backends::BlkBackendProcess;
use vmm_support::*;

#[test]
fn garbage_from_the_guest_gets_hardware_answers_and_the_backend_carries_on() {
    if !kvm_or_skip("garbage_from_the_guest_gets_hardware_answers_and_the_backend_carries_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut dd = BlkBackendProcess::driver_domain(dir.path(), 1 << 20, &[]);
    let socket = dd.socket.to_str().unwrap().to_string();
    // The guest checks each answer itself (all-ones reads, a queue that stays not ready,
    // DEVICE_NEEDS_RESET) and then runs the disk check on the same device after a reset.
    let run = run_vmm(&["--mode", "bad-input", "--blk-socket", &socket]);
    assert_eq!(
        run.code,
        Some(0),
        "guest status (2 = a bad-input check failed)"
    );
    assert!(run.console.contains("bad input ok"));
    assert!(run.console.contains("verify ok"));
    for logged in [
        "unknown port 0x2f0",
        "unbacked GPA 0xc0000000",
        "impossible queue size 3",
        "impossible queue size 65536",
        "outside shared memory",
        "DRIVER_OK without",
        "notify for nonexistent queue 9",
    ] {
        assert!(run.log.contains(logged), "VMM log lacks {logged:?}");
    }
    assert_eq!(run.field("totals:", "unknown_pio"), Some(4.0));
    assert_eq!(run.field("totals:", "unknown_mmio"), Some(2.0));
    assert!(dd.alive(), "driver domain survived the hostile guest");
    // Judged from the host: 32 requests are 16 single-sector writes of the pattern (seed 0).
    assert_pattern(&std::fs::read(&dd.image).unwrap(), 0, 16);

    // The next guest on the same driver domain works: the host wipes the sectors, the
    // guest writes them again.
    std::fs::write(&dd.image, vec![0u8; 1 << 20]).unwrap();
    let again = run_vmm(&["--mode", "disk", "--blk-socket", &socket]);
    assert_eq!(again.code, Some(0));
    assert!(again.console.contains("verify ok"));
    assert_pattern(&std::fs::read(&dd.image).unwrap(), 0, 16);
    assert!(dd.alive());
}

#[test]
fn full_ram_sharing_is_an_opt_in_that_still_bounds_rings() {
    if !kvm_or_skip("full_ram_sharing_is_an_opt_in_that_still_bounds_rings") {
        return;
    }
    // With all of RAM shared (an explicit, logged opt-in), a ring at an address that is
    // neither window nor RAM is still refused, and the regular disk check passes.
    let dir = tempfile::tempdir().unwrap();
    let dd = BlkBackendProcess::driver_domain(dir.path(), 1 << 20, &[]);
    let run = run_vmm(&[
        "--mode",
        "bad-input",
        "--share-all-ram",
        "--blk-socket",
        dd.socket.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0));
    assert!(run.log.contains("sharing all guest RAM"));
    assert!(run.log.contains("outside shared memory"));
}

#[test]
fn triple_fault_stops_the_machine_with_a_reset() {
    if !kvm_or_skip("triple_fault_stops_the_machine_with_a_reset") {
        return;
    }
    let run = run_vmm(&["--mode", "triple-fault"]);
    assert_eq!(run.code, Some(100), "reset exit status");
    assert!(run.console.contains("triple fault"));
    assert!(run.log.contains("guest reset"), "VMM reports the reset");
}
