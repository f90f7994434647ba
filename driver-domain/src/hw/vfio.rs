//! PCI functions owned through VFIO (type1 IOMMU, one container per device), with
//! `vfio-ioctls`: config space, BAR mapping, DMA mapping of the driver domain's own buffers,
//! interrupts delivered to eventfds, and the device request interrupt by which the host asks
//! for a device back.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::{Bdf, PciError, Sysfs};

/// Errors of VFIO device ownership.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{bdf} is bound to {driver}, not vfio-pci (bind it first: driver-domain hw bind {bdf} vfio-pci)")]
    NotVfioBound { bdf: Bdf, driver: String },
    #[error("{0} is in no IOMMU group (is the IOMMU enabled?)")]
    NoIommuGroup(Bdf),
    #[error("IOMMU group {group} of {bdf} is not viable: {member} is bound to {driver}")]
    GroupNotViable {
        bdf: Bdf,
        group: u32,
        member: Bdf,
        driver: String,
    },
    #[error("{bdf}: {what}: {source}")]
    Vfio {
        bdf: Bdf,
        what: &'static str,
        source: vfio_ioctls::VfioError,
    },
    #[error("{bdf}: {what}: {source}")]
    Os {
        bdf: Bdf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{bdf}: BAR0 cannot be mmapped (flags 0x{flags:x}, size {size})")]
    BarNotMappable { bdf: Bdf, flags: u32, size: u64 },
    #[error("{bdf}: access of {len} bytes at 0x{offset:x} is outside BAR0 ({size} bytes)")]
    OutsideBar {
        bdf: Bdf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{bdf}: the device has no {what} interrupt")]
    NoInterrupt { bdf: Bdf, what: &'static str },
    #[error("DMA buffer: access of {len} bytes at 0x{offset:x} is outside its {size} bytes")]
    OutsideDma {
        offset: usize,
        len: usize,
        size: usize,
    },
}

/// How a device's interrupts reach the driver domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    Msix,
    Intx,
}

/// A memory-mapped BAR, accessed only with volatile reads and writes.
pub struct MmioRegion {
    bdf: Bdf,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain device memory; nothing in it is tied to a thread, and every
// access is a volatile read or write of a bounds-checked offset.
unsafe impl Send for MmioRegion {}
// SAFETY: as above; concurrent volatile accesses are what device registers expect.
unsafe impl Sync for MmioRegion {}

impl MmioRegion {
    fn check(&self, offset: u64, len: u64) -> Result<usize, VfioError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len as u64) || offset & (len - 1) != 0 {
            return Err(VfioError::OutsideBar {
                bdf: self.bdf,
                offset,
                len,
                size: self.len as u64,
            });
        }
        Ok(offset as usize)
    }

    pub fn read32(&self, offset: u64) -> Result<u32, VfioError> {
        let off = self.check(offset, 4)?;
        // SAFETY: `off + 4 <= len` and `off` is 4-byte aligned, within the live mapping.
        Ok(unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        let off = self.check(offset, 4)?;
        // SAFETY: `off + 4 <= len` and `off` is 4-byte aligned, within the live mapping.
        unsafe {
            self.ptr
                .as_ptr()
                .add(off)
                .cast::<u32>()
                .write_volatile(value)
        };
        Ok(())
    }

    pub fn read64(&self, offset: u64) -> Result<u64, VfioError> {
        let off = self.check(offset, 8)?;
        // SAFETY: `off + 8 <= len` and `off` is 8-byte aligned, within the live mapping.
        Ok(unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    pub fn write64(&self, offset: u64, value: u64) -> Result<(), VfioError> {
        let off = self.check(offset, 8)?;
        // SAFETY: `off + 8 <= len` and `off` is 8-byte aligned, within the live mapping.
        unsafe {
            self.ptr
                .as_ptr()
                .add(off)
                .cast::<u64>()
                .write_volatile(value)
        };
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MmioRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map_bar0`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Anonymous memory of the driver domain mapped for device DMA at an IOVA.
///
/// The device may write it at any time, so it is only ever accessed with volatile operations
/// through raw pointers; it is unmapped from the IOMMU before it is freed.
pub struct DmaBuffer {
    container: Arc<VfioContainer>,
    ptr: NonNull<u8>,
    len: usize,
    iova: u64,
}

// SAFETY: the buffer is private anonymous memory; all access is volatile and bounds-checked.
unsafe impl Send for DmaBuffer {}

impl DmaBuffer {
    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, VfioError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(VfioError::OutsideDma {
                offset,
                len,
                size: self.len,
            });
        }
        // SAFETY: `offset + len <= self.len`, so the result stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Copies bytes in, volatile byte by byte.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), VfioError> {
        let p = self.check(offset, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `p + i` is inside the checked range.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Copies bytes out, volatile byte by byte.
    pub fn read_bytes(&self, offset: usize, len: usize) -> Result<Vec<u8>, VfioError> {
        let p = self.check(offset, len)?;
        // SAFETY: every `p + i` for `i < len` is inside the checked range.
        Ok((0..len)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect())
    }

    pub fn fill(&self, offset: usize, len: usize, value: u8) -> Result<(), VfioError> {
        let p = self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: `p + i` is inside the checked range.
            unsafe { p.add(i).write_volatile(value) };
        }
        Ok(())
    }

    pub fn read_u32(&self, offset: usize) -> Result<u32, VfioError> {
        let b = self.read_bytes(offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.container.vfio_dma_unmap(self.iova, self.len) {
            log::warn!("unmapping DMA iova 0x{:x}: {e}", self.iova);
        }
        // SAFETY: `ptr`/`len` are exactly the anonymous mapping made in `map_dma`, no longer
        // mapped for the device.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A PCI function owned through VFIO.
pub struct VfioPciDevice {
    bdf: Bdf,
    group: u32,
    sysfs_path: PathBuf,
    container: Arc<VfioContainer>,
    device: ManuallyDrop<VfioDevice>,
    bar0: Option<MmioRegion>,
    request: EventFd,
    /// The host asked for the device back (request interrupt seen).
    requested: bool,
}

impl VfioPciDevice {
    /// Opens a function bound to vfio-pci, after checking its IOMMU group is viable, and arms
    /// the request interrupt.
    pub fn open(sysfs: &Sysfs, bdf: Bdf) -> Result<Self, VfioError> {
        let f = sysfs.function(bdf)?;
        match f.driver.as_deref() {
            Some("vfio-pci") => {}
            other => {
                return Err(VfioError::NotVfioBound {
                    bdf,
                    driver: other.unwrap_or("no driver").to_string(),
                })
            }
        }
        let group = f.iommu_group.ok_or(VfioError::NoIommuGroup(bdf))?;
        for member in sysfs.iommu_group_members(group)? {
            if !member.leaves_group_viable() {
                return Err(VfioError::GroupNotViable {
                    bdf,
                    group,
                    member: member.bdf,
                    driver: member.driver.unwrap_or_default(),
                });
            }
        }
        let vfio = |what| move |source| VfioError::Vfio { bdf, what, source };
        let container = Arc::new(VfioContainer::new(None).map_err(vfio("opening the container"))?);
        let sysfs_path = sysfs.device_dir(bdf);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device =
            VfioDevice::new(&sysfs_path, ops, false).map_err(vfio("opening the device"))?;
        let request = EventFd::new(EFD_NONBLOCK).map_err(|e| VfioError::Os {
            bdf,
            what: "creating the request eventfd",
            source: e,
        })?;
        let dev = VfioPciDevice {
            bdf,
            group,
            sysfs_path,
            container,
            device: ManuallyDrop::new(device),
            bar0: None,
            request,
            requested: false,
        };
        if dev
            .device
            .get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
            .is_some_and(|i| i.count > 0)
        {
            dev.device
                .enable_irq(VFIO_PCI_REQ_IRQ_INDEX, vec![&dev.request])
                .map_err(vfio("arming the request interrupt"))?;
        } else {
            log::warn!("{bdf}: no device request interrupt; the host cannot ask for it back");
        }
        Ok(dev)
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    pub fn iommu_group(&self) -> u32 {
        self.group
    }

    /// Signalled when the host wants the device back (for example `sriov_numvfs` set to 0).
    pub fn request_eventfd(&self) -> &EventFd {
        &self.request
    }

    /// Records that the request interrupt fired: the kernel is removing the device and waits
    /// for it to be closed, so it is closed without looking at sysfs again (see `Drop`).
    pub fn mark_requested(&mut self) {
        self.requested = true;
    }

    fn config_offset(&self) -> u64 {
        self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX)
    }

    /// Reads config space at `offset` into `buf`.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = self.config_offset() + offset;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; the fd is the live device fd.
        let n = unsafe {
            libc::pread(
                self.device.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        self.io_result(n, buf.len(), "reading config space")
    }

    /// Writes `buf` to config space at `offset`.
    pub fn config_write(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let at = self.config_offset() + offset;
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads; the fd is the live device fd.
        let n = unsafe {
            libc::pwrite(
                self.device.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        self.io_result(n, buf.len(), "writing config space")
    }

    fn io_result(&self, n: isize, want: usize, what: &'static str) -> Result<(), VfioError> {
        if n == want as isize {
            return Ok(());
        }
        let source = if n < 0 {
            std::io::Error::last_os_error()
        } else {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short access")
        };
        Err(VfioError::Os {
            bdf: self.bdf,
            what,
            source,
        })
    }

    pub fn config_read_u16(&self, offset: u64) -> Result<u16, VfioError> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_read_u32(&self, offset: u64) -> Result<u32, VfioError> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets memory space and bus master enable in the command register.
    pub fn enable_bus_master(&self) -> Result<(), VfioError> {
        let cmd = self.config_read_u16(4)? | 0x6;
        self.config_write(4, &cmd.to_le_bytes())
    }

    /// Maps BAR0 (once) and returns it.
    pub fn bar0(&mut self) -> Result<&MmioRegion, VfioError> {
        if self.bar0.is_none() {
            let flags = self.device.get_region_flags(VFIO_PCI_BAR0_REGION_INDEX);
            let size = self.device.get_region_size(VFIO_PCI_BAR0_REGION_INDEX);
            if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
                return Err(VfioError::BarNotMappable {
                    bdf: self.bdf,
                    flags,
                    size,
                });
            }
            let offset = self.device.get_region_offset(VFIO_PCI_BAR0_REGION_INDEX);
            // SAFETY: a fresh shared mapping of the device fd at the region's offset; the kernel
            // checks offset and size against the region; nothing else aliases it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.device.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(VfioError::Os {
                    bdf: self.bdf,
                    what: "mmap of BAR0",
                    source: std::io::Error::last_os_error(),
                });
            }
            self.bar0 = NonNull::new(ptr.cast()).map(|ptr| MmioRegion {
                bdf: self.bdf,
                ptr,
                len: size as usize,
            });
        }
        self.bar0.as_ref().ok_or(VfioError::BarNotMappable {
            bdf: self.bdf,
            flags: 0,
            size: 0,
        })
    }

    /// The mapped BAR0, if [`Self::bar0`] mapped it.
    pub fn mapped_bar0(&self) -> Option<&MmioRegion> {
        self.bar0.as_ref()
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed memory and maps it at `iova`.
    pub fn map_dma(&self, iova: u64, len: usize) -> Result<DmaBuffer, VfioError> {
        let len = len.div_ceil(4096) * 4096;
        // SAFETY: a fresh private anonymous mapping; no Rust reference to it ever exists.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::Os {
                bdf: self.bdf,
                what: "allocating a DMA buffer",
                source: std::io::Error::last_os_error(),
            });
        }
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(VfioError::Os {
                bdf: self.bdf,
                what: "allocating a DMA buffer",
                source: std::io::Error::other("mmap returned null"),
            });
        };
        // SAFETY: the range is the mapping just made; it is only accessed through volatile
        // raw-pointer operations (DmaBuffer) and unmapped from the IOMMU before munmap.
        let mapped = unsafe { self.container.vfio_dma_map(iova, len, ptr.as_ptr()) };
        if let Err(source) = mapped {
            // SAFETY: the mapping made above, never shared.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            return Err(VfioError::Vfio {
                bdf: self.bdf,
                what: "VFIO_IOMMU_MAP_DMA",
                source,
            });
        }
        Ok(DmaBuffer {
            container: self.container.clone(),
            ptr,
            len,
            iova,
        })
    }

    /// Routes the device's first interrupt vector to `eventfd`: MSI-X where the device has
    /// it, else INTx (which must be unmasked with [`Self::unmask_intx`] after each interrupt).
    pub fn enable_interrupt(&self, eventfd: &EventFd) -> Result<IrqMode, VfioError> {
        let bdf = self.bdf;
        let has = |index| self.device.get_irq_info(index).is_some_and(|i| i.count > 0);
        let (mode, index) = if has(VFIO_PCI_MSIX_IRQ_INDEX) {
            (IrqMode::Msix, VFIO_PCI_MSIX_IRQ_INDEX)
        } else if has(VFIO_PCI_INTX_IRQ_INDEX) {
            (IrqMode::Intx, VFIO_PCI_INTX_IRQ_INDEX)
        } else {
            return Err(VfioError::NoInterrupt {
                bdf,
                what: "MSI-X or INTx",
            });
        };
        self.device
            .enable_irq(index, vec![eventfd])
            .map_err(|source| VfioError::Vfio {
                bdf,
                what: "routing the interrupt to an eventfd",
                source,
            })?;
        Ok(mode)
    }

    pub fn unmask_intx(&self) -> Result<(), VfioError> {
        self.device
            .unmask_irq(VFIO_PCI_INTX_IRQ_INDEX)
            .map_err(|source| VfioError::Vfio {
                bdf: self.bdf,
                what: "unmasking INTx",
                source,
            })
    }

    pub fn disable_interrupts(&self) {
        for index in [VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX] {
            if self.device.get_irq_info(index).is_some_and(|i| i.count > 0) {
                let _ = self.device.disable_irq(index);
            }
        }
    }

    /// Whether sysfs still shows the device in the IOMMU group it was opened in.
    fn still_in_group(&self) -> bool {
        std::fs::read_link(self.sysfs_path.join("iommu_group"))
            .ok()
            .and_then(|t| t.file_name()?.to_str()?.parse::<u32>().ok())
            == Some(self.group)
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // The BAR mapping holds the device open; it goes first.
        self.bar0 = None;
        self.disable_interrupts();
        if self
            .device
            .get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
            .is_some_and(|i| i.count > 0)
        {
            let _ = self.device.disable_irq(VFIO_PCI_REQ_IRQ_INDEX);
        }
        // A pending request that nobody consumed means the same as one that was seen.
        let requested = self.requested || self.request.read().is_ok();
        if !requested && self.still_in_group() {
            // SAFETY: dropped exactly once, here; the field is not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.device) };
        } else {
            // vfio-ioctls 0.10 closes the device fd and then looks the group up in sysfs,
            // unwrapping the result: once the fd is closed the kernel finishes removing a
            // requested device, the link vanishes and the drop panics. So close the device fd
            // here and leak the wrapper, with its container and group fds (two fds per
            // released device), instead.
            let fd: RawFd = self.device.as_raw_fd();
            // SAFETY: `fd` is the device fd owned by the wrapper, which is never dropped and
            // never used again, so the fd is closed exactly once.
            unsafe { libc::close(fd) };
            log::debug!("{}: closed after the host's request", self.bdf);
        }
    }
}

/// Waits up to `timeout` for one of `fds` to become readable and returns its index after
/// consuming its counter; `None` on timeout.
pub fn wait_eventfds(fds: &[&EventFd], timeout: Duration) -> Result<Option<usize>, std::io::Error> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        for (i, p) in pfds.iter().enumerate() {
            if p.revents & libc::POLLIN != 0 {
                // The counter only matters as "it fired"; a racing reader may have emptied it.
                let _ = fds[i].read();
                return Ok(Some(i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_accesses_are_bounds_and_alignment_checked() {
        // SAFETY: a fresh anonymous page, owned by the region below, which unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let region = MmioRegion {
            bdf: "0000:00:02.1".parse().unwrap(),
            ptr: NonNull::new(ptr.cast()).unwrap(),
            len: 4096,
        };
        region.write64(0xff8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(region.read64(0xff8).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(region.read32(0xffc).unwrap(), 0x1122_3344);
        for (offset, len) in [
            (0x1000, 4),
            (0xffe, 4),
            (0x2, 4),
            (0xffc, 8),
            (u64::MAX - 1, 4),
        ] {
            let r = if len == 4 {
                region.read32(offset).map(u64::from)
            } else {
                region.read64(offset)
            };
            assert!(
                matches!(r, Err(VfioError::OutsideBar { .. })),
                "{offset:#x}+{len} accepted"
            );
        }
        // A device-controlled doorbell stride cannot push a write outside the BAR.
        assert!(region.write32(0x1000 + (4 << 15), 1).is_err());
    }
}
