//! The registers hardware-reduced ACPI names in the FADT instead of PM1 fixed hardware: the
//! sleep control register (the guest writes `SLP_TYP << 2 | SLP_EN` to enter a sleep state;
//! S5 is power-off), the sleep status register, and the reset register. A write that ends
//! the machine is a [`BusEvent`] for the run loop, so a guest's `poweroff`/`reboot` reaches the
//! VMM instead of halting inside KVM.

use crate::vmm::arch::{
    RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use crate::vmm::bus::BusEvent;

const SLP_EN: u8 = 1 << 5;

/// Whether `port` is one of these registers.
pub fn decodes(port: u16) -> bool {
    matches!(port, SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT | RESET_PORT)
}

/// A register read: nothing is ever pending (the machine never wakes from a sleep state).
pub fn read(_port: u16, data: &mut [u8]) {
    data.fill(0);
}

/// A register write: power-off (S5), reset, or nothing (other sleep states are refused by not
/// sleeping; the guest sees its write ignored).
pub fn write(port: u16, data: &[u8]) -> Option<BusEvent> {
    let &[value, ..] = data else {
        return None;
    };
    match port {
        SLEEP_CONTROL_PORT if value & SLP_EN != 0 => {
            let sleep_type = (value >> 2) & 0x7;
            if sleep_type == S5_SLEEP_TYPE {
                return Some(BusEvent::Poweroff(0));
            }
            log::warn!("guest asked for sleep state type {sleep_type}; ignored");
            None
        }
        RESET_PORT if value == RESET_VALUE => Some(BusEvent::Reset("ACPI reset register")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_reset_resets_and_the_rest_is_ignored() {
        assert_eq!(
            write(SLEEP_CONTROL_PORT, &[(5 << 2) | SLP_EN]),
            Some(BusEvent::Poweroff(0))
        );
        assert_eq!(write(SLEEP_CONTROL_PORT, &[5 << 2]), None, "no SLP_EN");
        assert_eq!(write(SLEEP_CONTROL_PORT, &[(3 << 2) | SLP_EN]), None, "S3");
        assert!(matches!(write(RESET_PORT, &[1]), Some(BusEvent::Reset(_))));
        assert_eq!(write(RESET_PORT, &[2]), None);
        assert_eq!(write(RESET_PORT, &[]), None);
        let mut b = [0xffu8; 1];
        read(SLEEP_STATUS_PORT, &mut b);
        assert_eq!(b, [0]);
    }
}
