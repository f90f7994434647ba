//! splitvmm's tiny guest kernel: boots in 64-bit mode (the VMM builds the page tables and GDT),
//! says hello on COM1, reads the boot info the VMM left at 0x7000, and depending on the mode
//! runs a virtio-blk write/verify through the driver domain, exercises bad input, or
//! triple-faults on purpose. It powers off with a status byte on port 0xf4.

#![no_std]
#![no_main]

mod bad_input;
mod disk;
mod irq;
mod mmio;
mod platform;
mod rt;

use platform::{print, GuestMode};

/// Entry point: the VMM enters here in 64-bit mode with a stack and interrupts off.
#[no_mangle]
#[link_section = ".text.entry"]
pub extern "C" fn _start() -> ! {
    print("hello\n");
    let Some(info) = platform::read_boot_info() else {
        print("no boot info\n");
        platform::poweroff(platform::STATUS_NO_BOOT_INFO)
    };
    match info.mode {
        GuestMode::Hello => platform::poweroff(platform::STATUS_OK),
        GuestMode::TripleFault => {
            print("triple fault\n");
            irq::triple_fault()
        }
        GuestMode::Disk => platform::poweroff(disk::run(&info)),
        GuestMode::BadInput => {
            if let Err(check) = bad_input::run(&info) {
                print("bad input check failed: ");
                platform::print_u64(u64::from(check));
                print("\n");
                platform::poweroff(platform::STATUS_BAD_INPUT_FAILED)
            }
            print("bad input ok\n");
            platform::poweroff(disk::run(&info))
        }
        GuestMode::Halt => {
            print("halting\n");
            irq::init();
            loop {
                irq::wait_for_interrupt();
            }
        }
    }
}
