//! ACPI tables for a Linux guest, built with the `acpi_tables` crate: hardware-reduced ACPI as
//! Cloud Hypervisor and Firecracker do it. RSDP -> XSDT -> FADT (sleep control/status and
//! reset registers, no fixed-feature hardware), MADT (a local APIC per vCPU, the I/O APIC, an
//! interrupt source override for COM1), MCFG (ECAM of bus 0) and a DSDT holding `_S5_`, the
//! PCI0 root bridge (`_CRS`, `_PRT`, and ACPI PCI hotplug as Linux's `acpiphp` expects it: a
//! device per slot with `_ADR`, `_SUN` and `_EJ0`, and `PSCN`, which notifies the slots the
//! VMM flagged), COM1, and a Generic Event Device whose events notify the power button or run
//! `PSCN`.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, Device, EISAName, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method,
    MethodCall, Name, Notify, OpRegion, OpRegionSpace, Package, PackageBuilder, Path,
    ResourceTemplate, ShiftLeft, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::vmm::layout::{IOAPIC_GPA, LAPIC_GPA};

/// Errors writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("the ACPI tables do not fit below 1 MiB ({0} bytes)")]
    TooBig(u64),
    #[error("writing the ACPI tables: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("{0} vCPUs do not fit in the MADT")]
    Vcpus(u8),
}

const OEM_ID: [u8; 6] = *b"SPLITV";
const OEM_TABLE_ID: [u8; 8] = *b"SPLITVMM";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC (and, bit 1 clear, no 8042): the guest does not probe
/// legacy devices that are not there.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT interrupt source override: ISA IRQ 4 (COM1) is GSI 4, edge, active high.
const MADT_ISO: [u8; 10] = [2, 10, 0, 4, 4, 0, 0, 0, 0, 0];

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Appends an interrupt controller structure to a serialised MADT, fixing its length and
/// checksum (`acpi_tables` has no x86 interrupt source override structure).
fn madt_append(table: &mut Vec<u8>, structure: &[u8]) {
    table.extend_from_slice(structure);
    let len = table.len() as u32;
    table[4..8].copy_from_slice(&len.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// Already serialised AML, as a child of a builder object.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// The name of slot `s`'s device under PCI0.
fn slot_name(s: usize) -> String {
    format!("S{s:03}")
}

/// ACPI PCI hotplug inside PCI0: the registers (`PCST` in system I/O: `PCIU`, `PCID`,
/// `B0EJ`), `PCEJ(slot)` writing `1 << slot` to `B0EJ`, `PSCN` notifying device check (1) for
/// the slots in `PCIU` and eject request (3) for those in `PCID`, and a device per slot 1..31
/// (`_ADR` slot << 16, `_SUN` the slot, `_EJ0` calling `PCEJ`). `acpiphp` registers a
/// hotplug slot for each, rescans it on device check, and on eject request removes the
/// function's driver and calls `_EJ0`.
fn pci_hotplug() -> Vec<Raw> {
    let mut out = Vec::new();
    let port = u32::from(PCI_HOTPLUG_PORT);
    let len = u32::from(PCI_HOTPLUG_BYTES);
    out.push(Raw(bytes(&OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemIO,
        &port,
        &len,
    ))));
    out.push(Raw(bytes(&Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    ))));
    let one = 1u8;
    let shifted = ShiftLeft::new(&aml::ZERO, &one, &Arg(0));
    let b0ej = Path::new("B0EJ");
    out.push(Raw(bytes(&Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![&Store::new(&b0ej, &shifted)],
    ))));
    let (up, down) = (Local(0), Local(1));
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let mut scan = Vec::new();
    scan.push(Raw(bytes(&Store::new(&up, &pciu))));
    scan.push(Raw(bytes(&Store::new(&down, &pcid))));
    for s in 1..crate::vmm::pci::SLOTS {
        let bit = 1u32 << s;
        let slot = Path::new(&slot_name(s));
        let (check, eject) = (1u8, 3u8);
        let up_bit = aml::And::new(&aml::ZERO, &up, &bit);
        let down_bit = aml::And::new(&aml::ZERO, &down, &bit);
        scan.push(Raw(bytes(&If::new(
            &up_bit,
            vec![&Notify::new(&slot, &check)],
        ))));
        scan.push(Raw(bytes(&If::new(
            &down_bit,
            vec![&Notify::new(&slot, &eject)],
        ))));
    }
    let scan_refs: Vec<&dyn Aml> = scan.iter().map(|r| r as &dyn Aml).collect();
    out.push(Raw(bytes(&Method::new("PSCN".into(), 0, true, scan_refs))));
    for s in 1..crate::vmm::pci::SLOTS {
        let adr = (s as u32) << 16;
        let sun = s as u32;
        let sun_path = Path::new("_SUN");
        let eject = MethodCall::new("PCEJ".into(), vec![&sun_path]);
        out.push(Raw(bytes(&Device::new(
            slot_name(s).as_str().into(),
            vec![
                &Name::new("_ADR".into(), &adr),
                &Name::new("_SUN".into(), &sun),
                &Method::new("_EJ0".into(), 1, false, vec![&eject]),
            ],
        ))));
    }
    out
}

fn pci_root_bridge() -> Vec<u8> {
    let mmio_end = (PCI_MMIO_GPA + PCI_MMIO_BYTES - 1) as u32;
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mem = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_GPA as u32,
        mmio_end,
        None,
    );
    let mem64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO64_GPA,
        PCI_MMIO64_GPA + PCI_MMIO64_BYTES - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem, &mem64]);
    // INTx of every slot and pin, swizzled over I/O APIC pins 16..23 (devices here use MSI-X;
    // the table is what a driver falls back to).
    let mut prt = PackageBuilder::new();
    for slot in 0u32..32 {
        for pin in 0u32..4 {
            let addr = (slot << 16) | 0xffff;
            let gsi = PCI_INTX_GSI_BASE + (slot + pin) % 8;
            let zero = 0u8;
            prt.add_element(&Package::new(vec![&addr, &(pin as u8), &zero, &gsi]));
        }
    }
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let (n_hid, n_cid) = (
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
    );
    let (n_adr, n_seg, n_uid, n_bbn) = (
        Name::new("_ADR".into(), &0u32),
        Name::new("_SEG".into(), &0u16),
        Name::new("_UID".into(), &0u8),
        Name::new("_BBN".into(), &0u8),
    );
    let (n_crs, n_prt) = (
        Name::new("_CRS".into(), &crs),
        Name::new("_PRT".into(), &prt),
    );
    let hotplug = pci_hotplug();
    let mut children: Vec<&dyn Aml> = vec![
        &n_hid, &n_cid, &n_adr, &n_seg, &n_uid, &n_bbn, &n_crs, &n_prt,
    ];
    children.extend(hotplug.iter().map(|r| r as &dyn Aml));
    bytes(&Device::new("_SB_.PCI0".into(), children))
}

/// A 16550 UART (PNP0501): COM1 (`uid` 0) or COM2 (`uid` 1).
fn uart(name: &str, uid: u8, port: u16, irq: u32) -> Vec<u8> {
    let hid = EISAName::new("PNP0501");
    let ports = IO::new(port, port, 0, 8);
    let irq = Interrupt::new(true, true, false, false, irq);
    let crs = ResourceTemplate::new(vec![&ports, &irq]);
    bytes(&Device::new(
        format!("_SB_.{name}").as_str().into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The power button (a control-method button, PNP0C0C) and the Generic Event Device
/// (ACPI0013) with two interrupts whose `_EVT(gsi)` notifies the button (0x80: pressed) on
/// the first and runs the PCI hotplug scan on the second.
fn power_button() -> Vec<u8> {
    let hid = EISAName::new("PNP0C0C");
    let mut out = bytes(&Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &0u8),
        ],
    ));
    let irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let hotplug_irq = Interrupt::new(true, true, false, false, PCI_HOTPLUG_IRQ);
    let crs = ResourceTemplate::new(vec![&irq, &hotplug_irq]);
    let button = Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = Notify::new(&button, &pressed);
    let (button_gsi, hotplug_gsi) = (GED_IRQ, PCI_HOTPLUG_IRQ);
    let is_button = Equal::new(&Arg(0), &button_gsi);
    let is_hotplug = Equal::new(&Arg(0), &hotplug_gsi);
    let scan = MethodCall::new("\\_SB_.PCI0.PSCN".into(), vec![]);
    let on_button = If::new(&is_button, vec![&notify]);
    let on_hotplug = If::new(&is_hotplug, vec![&scan]);
    let ged_hid: aml::AmlStr = "ACPI0013";
    out.extend(bytes(&Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &ged_hid),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
            &Method::new("_EVT".into(), 1, true, vec![&on_button, &on_hotplug]),
        ],
    )));
    out
}

/// The DSDT's definition block; COM2 (a driver VM's tunnel) only if `com2`.
pub fn dsdt(com2: bool) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = S5_SLEEP_TYPE;
    let zero = 0u8;
    dsdt.append_slice(&bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5, &s5, &zero, &zero]),
    )));
    dsdt.append_slice(&pci_root_bridge());
    dsdt.append_slice(&uart("COM1", 0, 0x3f8, COM1_IRQ));
    if com2 {
        dsdt.append_slice(&uart("COM2", 1, COM2_PORT, COM2_IRQ));
    }
    dsdt.append_slice(&power_button());
    dsdt
}

fn fadt(dsdt_gpa: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_gpa)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = io(RESET_PORT);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io(SLEEP_STATUS_PORT);
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"SPLITVMM").into();
    bytes(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_GPA as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_GPA as u32, 0));
    let mut table = bytes(&m);
    madt_append(&mut table, &MADT_ISO);
    table
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(ECAM_GPA, 0, 0, 0);
    bytes(&m)
}

/// Writes every table from [`ACPI_GPA`] (with COM2 if `com2`); returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, com2: bool) -> Result<u64, AcpiError> {
    if vcpus == 0 || vcpus == u8::MAX {
        return Err(AcpiError::Vcpus(vcpus));
    }
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(ACPI_GPA + Rsdp::len() as u64);
    let mut place = |table: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        next = align(at + table.len() as u64);
        if next > ACPI_END {
            return Err(AcpiError::TooBig(next - ACPI_GPA));
        }
        mem.write_slice(table, GuestAddress(at))
            .map_err(AcpiError::Write)?;
        Ok(at)
    };
    let dsdt_gpa = place(dsdt(com2).as_slice())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(&fadt(dsdt_gpa))?);
    xsdt.add_entry(place(&madt(vcpus))?);
    xsdt.add_entry(place(&mcfg())?);
    let xsdt_gpa = place(&bytes(&xsdt))?;
    mem.write_slice(&bytes(&Rsdp::new(OEM_ID, xsdt_gpa)), GuestAddress(ACPI_GPA))
        .map_err(AcpiError::Write)?;
    Ok(ACPI_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn table_at(mem: &GuestMemoryMmap, gpa: u64) -> Vec<u8> {
        let mut head = [0u8; 8];
        mem.read_slice(&mut head, GuestAddress(gpa)).unwrap();
        let mut t = vec![0u8; u32_at(&head, 4) as usize];
        mem.read_slice(&mut t, GuestAddress(gpa)).unwrap();
        t
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_gpa = write_tables(&mem, 3, false).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_gpa)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table_at(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let sigs: Vec<[u8; 4]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| {
                let t = table_at(&mem, u64_at(&xsdt, o));
                assert!(checksum_ok(&t), "{:?}", &t[..4]);
                t[..4].try_into().unwrap()
            })
            .collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"MCFG"]);

        let fadt = table_at(&mem, u64_at(&xsdt, 36));
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        // RESET_REG (GAS at 116: system I/O, 8 bits) and its value.
        assert_eq!((fadt[116], fadt[117]), (1, 8));
        assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG (GAS at 244 and 256).
        assert_eq!(u64_at(&fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(&fadt, 260), u64::from(SLEEP_STATUS_PORT));
        let dsdt = table_at(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        for name in [
            &b"_S5_"[..],
            b"PCI0",
            b"_PRT",
            b"_CRS",
            b"GED_",
            b"PWRB",
            b"_EVT",
            b"PSCN",
            b"PCEJ",
            b"B0EJ",
            b"S001",
            b"S031",
            b"_EJ0",
            b"_SUN",
        ] {
            assert!(dsdt.windows(4).any(|w| w == name), "{name:?}");
        }

        let madt = table_at(&mem, u64_at(&xsdt, 44));
        assert_eq!(u32_at(&madt, 36), LAPIC_GPA as u32);
        let mut kinds = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            kinds.push((madt[o], madt.get(o + 3).copied()));
            o += madt[o + 1] as usize;
        }
        assert_eq!(o, madt.len());
        assert_eq!(
            kinds,
            [
                (0, Some(0)),
                (0, Some(1)),
                (0, Some(2)),
                (1, Some(0)),
                (2, Some(4))
            ],
            "three local APICs (ids 0..2), the I/O APIC, the override of IRQ 4"
        );

        let mcfg = table_at(&mem, u64_at(&xsdt, 52));
        assert_eq!(u64_at(&mcfg, 44), ECAM_GPA);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");
    }

    #[test]
    fn too_many_vcpus_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(write_tables(&mem, 0, false).is_err());
        assert!(write_tables(&mem, 255, false).is_err());
    }

    #[test]
    fn com2_and_the_64_bit_window_are_declared() {
        let without = dsdt(false);
        let with = dsdt(true);
        let has = |t: &Sdt, name: &[u8]| t.as_slice().windows(name.len()).any(|w| w == name);
        assert!(has(&without, b"COM1") && !has(&without, b"COM2"));
        assert!(has(&with, b"COM1") && has(&with, b"COM2"));
        // COM2's IO descriptor: 0x47, decode16, min = max = 0x2f8, alignment 0, 8 ports.
        assert!(has(&with, &[0x47, 1, 0xf8, 0x02, 0xf8, 0x02, 0, 8]));
        // The 64-bit window: a QWord memory descriptor (0x8a) whose minimum is 4 GiB.
        let qword = with.as_slice().windows(1).position(|w| w[0] == 0x8a);
        let at = qword.expect("a QWord address space descriptor");
        let min = u64::from_le_bytes(with.as_slice()[at + 14..at + 22].try_into().unwrap());
        assert_eq!(min, PCI_MMIO64_GPA);
    }
}
