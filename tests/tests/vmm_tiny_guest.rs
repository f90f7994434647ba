//! The tiny KVM guest under splitvmm-vmm: boot, console, poweroff, and a disk write/verify
//! through the real driver domain over vhost-user, with the data path bypassing the VMM.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use std::time::Duration;

use splitvmm_tests::backends::BlkBackendProcess;
use vmm_support::*;

#[test]
fn tiny_guest_says_hello_and_powers_off() {
    if !kvm_or_skip("tiny_guest_says_hello_and_powers_off") {
        return;
    }
    let run = run_vmm(&["--mode", "hello"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.console, "hello\n");
    assert!(run.log.contains("guest powered off, status 0"));
    // Every console byte was one port write that exited to the VMM.
    assert_eq!(run.field("totals:", "serial_out"), Some(6.0));
}

#[test]
fn sigterm_stops_a_running_guest() {
    if !kvm_or_skip("sigterm_stops_a_running_guest") {
        return;
    }
    let child = spawn_vmm(&["--mode", "halt", "--vcpus", "2"]);
    // SIGTERM once the guest has said it is halting: it is running then.
    let run = terminate_when_console_shows(child, "halting", Duration::from_secs(10));
    assert_eq!(run.code, Some(102), "terminated exit status");
    assert!(run.console.contains("halting"));
    assert!(run.log.contains("terminated"));
}

/// A disk run; the temporary directory holding the image and socket lives as long as the
/// returned guard.
struct DiskRun {
    run: VmmRun,
    dd: BlkBackendProcess,
    _dir: tempfile::TempDir,
}

fn disk_run(ring: &str, batch: &str, backend_args: &[&str]) -> DiskRun {
    let dir = tempfile::tempdir().unwrap();
    let mut dd = BlkBackendProcess::driver_domain(dir.path(), 1 << 20, backend_args);
    let run = run_vmm(&[
        "--mode",
        "disk",
        "--blk-socket",
        dd.socket.to_str().unwrap(),
        "--ring",
        ring,
        "--batch",
        batch,
        "--requests",
        "32",
    ]);
    assert!(dd.alive(), "the driver domain must outlive its guest");
    DiskRun { run, dd, _dir: dir }
}

fn assert_disk_ok(d: &DiskRun) {
    let (run, dd) = (&d.run, &d.dd);
    assert_eq!(run.code, Some(0), "guest status");
    assert!(run.console.contains("verify ok"), "guest verify");
    // The host reads the image: sectors 0..16 hold the pattern, the rest is untouched.
    let img = std::fs::read(&dd.image).unwrap();
    assert_pattern(&img, 0, 16);
    assert!(
        img[16 * 512..].iter().all(|&b| b == 0),
        "beyond the written sectors"
    );
    // The backend was stopped (GET_VRING_BASE) after all 32 requests, before memory went away.
    assert!(
        run.log
            .contains("backend stopped at avail index 32 (GET_VRING_BASE)"),
        "quiesce before free"
    );
}

#[test]
fn disk_write_verify_through_the_driver_domain_event_idx() {
    if !kvm_or_skip("disk_write_verify_through_the_driver_domain_event_idx") {
        return;
    }
    let d = disk_run("event-idx", "1", &[]);
    assert_disk_ok(&d);
    let run = &d.run;
    assert_eq!(run.field("guest:", "requests"), Some(32.0));
    assert_eq!(run.field("guest:", "completed"), Some(32.0));
}

#[test]
fn notify_mode_requests_bypass_the_vmm() {
    if !kvm_or_skip("notify_mode_requests_bypass_the_vmm") {
        return;
    }
    let d = disk_run("notify", "1", &[]);
    assert_disk_ok(&d);
    let run = &d.run;
    // Every request was kicked (KVM ioeventfd), yet no kick reached the VMM...
    assert_eq!(run.field("guest:", "kicks"), Some(32.0));
    assert_eq!(run.io_count("virtio_notify_exit"), 0);
    // ...and the only exits to the VMM in the I/O phase are the interrupt-status read and
    // acknowledge after each wake-up by an interrupt. The guest sleeps for every request, so
    // there is at least one per request (one wake-up may cover two interrupts).
    let irqs = run.field("guest:", "interrupts").unwrap() as u64;
    let isr_reads = run.io_count("virtio_isr_read");
    assert!(
        (32..=irqs).contains(&isr_reads),
        "{isr_reads} status reads, {irqs} interrupts"
    );
    assert_eq!(run.io_count("virtio_isr_ack"), isr_reads);
    let vmm_exits = run.io_count("mmio_read")
        + run.io_count("mmio_write")
        + run.io_count("pio_in")
        + run.io_count("pio_out");
    // One port write is the phase marker that ends the I/O phase.
    assert_eq!(vmm_exits, 2 * isr_reads + 1);
    assert!(run.io_count("kvm.exits") > 0, "KVM binary stats were read");
}

#[test]
fn batched_event_idx_kicks_once_per_batch() {
    if !kvm_or_skip("batched_event_idx_kicks_once_per_batch") {
        return;
    }
    let d = disk_run("event-idx", "8", &[]);
    assert_disk_ok(&d);
    let run = &d.run;
    // 32 requests in 4 batches: at most one kick each (fewer when the backend was still
    // looking at the ring when the next batch was published).
    let kicks = run.field("guest:", "kicks").unwrap();
    assert!((1.0..=4.0).contains(&kicks), "{kicks} kicks");
    // The guest sleeps at least once per batch.
    assert!(run.io_count("virtio_isr_read") >= 4);
    assert!(run.field("guest:", "interrupts").unwrap() >= 4.0);
}

#[test]
fn polling_guest_takes_no_interrupts() {
    if !kvm_or_skip("polling_guest_takes_no_interrupts") {
        return;
    }
    let d = disk_run("poll", "1", &["--poll-us", "200000"]);
    assert_disk_ok(&d);
    let run = &d.run;
    assert_eq!(run.io_count("virtio_isr_read"), 0);
    assert_eq!(run.io_count("kvm.irq_injections"), 0);
}
