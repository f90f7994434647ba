//! A thin wrapper of the VFIO ioctls (`vfio-bindings` structures, `vmm-sys-util` ioctl
//! helpers) for the VMM: a type1 container, a group and a device, each an owned descriptor.
//!
//! Why not `vfio-ioctls`: its `VfioContainer`/`VfioDevice` open `/dev/vfio/<group>` by path and
//! have no constructor that adopts a group descriptor someone else opened. A guest's VMM gets
//! its group from the driver domain over the control channel (SCM_RIGHTS) and must not be able
//! to open groups itself, so the VMM takes the group as a descriptor; opening by path
//! ([`VfioGroup::open`]) is the by-hand case (`splitvmm-vmm --vfio`). Only what the VMM needs
//! is here: group status and container, type1 DMA map/unmap, device region and IRQ info,
//! region reads/writes, MSI-X eventfds, reset.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_irq_set, vfio_region_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_BASE,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
    VFIO_TYPE1_IOMMU,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// Errors of the VFIO ioctls.
#[derive(Debug, thiserror::Error)]
pub enum VfioSysError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Ioctl {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("VFIO API version {0}, expected {VFIO_API_VERSION}")]
    ApiVersion(i32),
    #[error("the kernel has no type1 IOMMU for VFIO")]
    NoType1,
    #[error("the IOMMU group is not viable (a device of the group is bound to a host driver)")]
    NotViable,
    #[error("device name {0:?} is not a PCI address")]
    BadName(String),
    #[error("{what} at {offset:#x} ({len} bytes): {source}")]
    Region {
        what: &'static str,
        offset: u64,
        len: usize,
        source: std::io::Error,
    },
}

fn last(op: &'static str) -> VfioSysError {
    VfioSysError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Container descriptors opened before the VMM was confined (a confined VMM has no `/dev`):
/// one per function it will be handed; [`VfioContainer::open`] takes them first.
static PREOPENED_CONTAINERS: std::sync::Mutex<Vec<File>> = std::sync::Mutex::new(Vec::new());

/// Opens `count` containers now, for a VMM about to be confined.
pub fn preopen_containers(count: usize) -> Result<(), VfioSysError> {
    let mut files = Vec::with_capacity(count);
    for _ in 0..count {
        files.push(open_container_device()?);
    }
    PREOPENED_CONTAINERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(files);
    Ok(())
}

fn open_container_device() -> Result<File, VfioSysError> {
    let path = "/dev/vfio/vfio";
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| VfioSysError::Open {
            path: path.into(),
            source,
        })
}

/// A type1 VFIO container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct VfioContainer {
    file: File,
    iommu_set: bool,
}

impl VfioContainer {
    /// Opens a fresh container and checks the API version and type1 support.
    /// A descriptor opened before confinement is used first.
    pub fn open() -> Result<Self, VfioSysError> {
        let preopened = PREOPENED_CONTAINERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let file = match preopened {
            Some(file) => file,
            None => open_container_device()?,
        };
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a number.
        let v = unsafe { ioctl(&file, VFIO_GET_API_VERSION()) };
        if v != VFIO_API_VERSION as i32 {
            return Err(VfioSysError::ApiVersion(v));
        }
        Ok(Self {
            file,
            iommu_set: false,
        })
    }

    /// Selects the type1 IOMMU (v2 if offered); needs a group attached first.
    fn set_iommu(&mut self) -> Result<(), VfioSysError> {
        if self.iommu_set {
            return Ok(());
        }
        let has = |t: u32| {
            // SAFETY: VFIO_CHECK_EXTENSION takes an integer and returns a number.
            let r = unsafe { ioctl_with_val(&self.file, VFIO_CHECK_EXTENSION(), t.into()) };
            r > 0
        };
        let kind = if has(VFIO_TYPE1v2_IOMMU) {
            VFIO_TYPE1v2_IOMMU
        } else if has(VFIO_TYPE1_IOMMU) {
            VFIO_TYPE1_IOMMU
        } else {
            return Err(VfioSysError::NoType1);
        };
        // SAFETY: VFIO_SET_IOMMU takes an integer; the result is checked.
        if unsafe { ioctl_with_val(&self.file, VFIO_SET_IOMMU(), kind.into()) } < 0 {
            return Err(last("VFIO_SET_IOMMU"));
        }
        self.iommu_set = true;
        Ok(())
    }

    /// Maps `size` bytes of this process's memory at `vaddr` for device DMA at `iova`
    /// (read and write). The kernel pins the pages (RLIMIT_MEMLOCK applies).
    ///
    /// # Safety
    /// `vaddr..vaddr + size` must stay mapped until [`VfioContainer::unmap_dma`] (or the
    /// container's end): the device may write it at any time.
    pub unsafe fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), VfioSysError> {
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        // SAFETY: a valid, fully initialised argument; the caller keeps the memory mapped.
        if unsafe { ioctl_with_ref(&self.file, VFIO_IOMMU_MAP_DMA(), &map) } < 0 {
            return Err(last("VFIO_IOMMU_MAP_DMA"));
        }
        Ok(())
    }

    /// Removes the mapping of `iova..iova + size`.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<(), VfioSysError> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            data: Default::default(),
        };
        // SAFETY: a valid argument; the kernel writes back the unmapped size.
        if unsafe { ioctl_with_mut_ref(&self.file, VFIO_IOMMU_UNMAP_DMA(), &mut unmap) } < 0 {
            return Err(last("VFIO_IOMMU_UNMAP_DMA"));
        }
        Ok(())
    }
}

/// A VFIO group (`/dev/vfio/<n>`), opened here or received as a descriptor.
#[derive(Debug)]
pub struct VfioGroup {
    fd: OwnedFd,
}

impl VfioGroup {
    /// Opens `/dev/vfio/<n>` (by hand; a managed VMM receives the descriptor instead).
    pub fn open(path: &Path) -> Result<Self, VfioSysError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| VfioSysError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self { fd: file.into() })
    }

    /// Adopts a group descriptor opened by someone else (the driver domain).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Checks the group is viable, attaches it to `container` and selects type1.
    pub fn attach(&self, container: &mut VfioContainer) -> Result<(), VfioSysError> {
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: a valid argument the kernel fills in.
        if unsafe { ioctl_with_mut_ref(&self.fd, VFIO_GROUP_GET_STATUS(), &mut status) } < 0 {
            return Err(last("VFIO_GROUP_GET_STATUS"));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioSysError::NotViable);
        }
        let cfd: RawFd = container.file.as_raw_fd();
        // SAFETY: the argument is a pointer to the container's descriptor, valid for the call.
        if unsafe { ioctl_with_ref(&self.fd, VFIO_GROUP_SET_CONTAINER(), &cfd) } < 0 {
            return Err(last("VFIO_GROUP_SET_CONTAINER"));
        }
        container.set_iommu()
    }

    /// The device `name` (a PCI address, `DDDD:BB:DD.F`) of this group.
    pub fn device(&self, name: &str) -> Result<VfioDevice, VfioSysError> {
        if !super::valid_bdf(name) {
            return Err(VfioSysError::BadName(name.into()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| VfioSysError::BadName(name.into()))?;
        // SAFETY: a NUL-terminated string valid for the call; the result is a new fd or -1.
        let fd = unsafe { ioctl_with_ptr(&self.fd, VFIO_GROUP_GET_DEVICE_FD(), cname.as_ptr()) };
        if fd < 0 {
            return Err(last("VFIO_GROUP_GET_DEVICE_FD"));
        }
        // SAFETY: a fresh descriptor the kernel just gave us.
        let file = unsafe { File::from_raw_fd(fd) };
        VfioDevice::new(file)
    }
}

impl AsFd for VfioGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One region of a device (BAR, config space, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device descriptor (for pread/pwrite/mmap).
    pub offset: u64,
}

/// A VFIO device descriptor.
#[derive(Debug)]
pub struct VfioDevice {
    file: File,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl VfioDevice {
    fn new(file: File) -> Result<Self, VfioSysError> {
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: a valid argument the kernel fills in.
        if unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO(), &mut info) } < 0 {
            return Err(last("VFIO_DEVICE_GET_INFO"));
        }
        Ok(Self {
            file,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        })
    }

    pub fn region(&self, index: u32) -> Result<RegionInfo, VfioSysError> {
        let mut info = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: a valid argument the kernel fills in (argsz excludes capabilities).
        if unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_GET_REGION_INFO(), &mut info) } < 0 {
            return Err(last("VFIO_DEVICE_GET_REGION_INFO"));
        }
        Ok(RegionInfo {
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// Number of interrupts of IRQ index `index` (0 if it has none).
    pub fn irq_count(&self, index: u32) -> Result<u32, VfioSysError> {
        let mut info = vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: a valid argument the kernel fills in.
        if unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_GET_IRQ_INFO(), &mut info) } < 0 {
            return Err(last("VFIO_DEVICE_GET_IRQ_INFO"));
        }
        Ok(info.count)
    }

    /// Triggers interrupts `0..fds.len()` of `index` on these eventfds, all at once (the
    /// 6.1 kernel cannot add MSI-X vectors to an enabled set one by one).
    pub fn enable_irqs(&self, index: u32, fds: &[RawFd]) -> Result<(), VfioSysError> {
        let header = std::mem::size_of::<vfio_irq_set>();
        let mut buf = vec![0u8; header + 4 * fds.len()];
        let set = vfio_irq_set {
            argsz: buf.len() as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: fds.len() as u32,
            data: Default::default(),
        };
        for (i, w) in [set.argsz, set.flags, set.index, set.start, set.count]
            .iter()
            .enumerate()
        {
            buf[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        for (i, fd) in fds.iter().enumerate() {
            buf[header + 4 * i..header + 4 * i + 4].copy_from_slice(&fd.to_ne_bytes());
        }
        // SAFETY: `buf` is a vfio_irq_set header followed by `count` descriptors, as argsz
        // says; the kernel only reads it.
        if unsafe { ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) } < 0 {
            return Err(last("VFIO_DEVICE_SET_IRQS (enable)"));
        }
        Ok(())
    }

    /// Disables every interrupt of `index`.
    pub fn disable_irqs(&self, index: u32) -> Result<(), VfioSysError> {
        let set = vfio_irq_set {
            argsz: std::mem::size_of::<vfio_irq_set>() as u32,
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
            data: Default::default(),
        };
        // SAFETY: a valid header-only argument.
        if unsafe { ioctl_with_ref(&self.file, VFIO_DEVICE_SET_IRQS(), &set) } < 0 {
            return Err(last("VFIO_DEVICE_SET_IRQS (disable)"));
        }
        Ok(())
    }

    /// Function-level (or other) reset of the device.
    pub fn reset(&self) -> Result<(), VfioSysError> {
        // SAFETY: no argument.
        if unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) } < 0 {
            return Err(last("VFIO_DEVICE_RESET"));
        }
        Ok(())
    }

    /// Reads `data.len()` bytes at `offset` of the region at `region`.
    pub fn read(
        &self,
        region: &RegionInfo,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioSysError> {
        self.file
            .read_exact_at(data, region.offset + offset)
            .map_err(|source| VfioSysError::Region {
                what: "read",
                offset,
                len: data.len(),
                source,
            })
    }

    pub fn write(&self, region: &RegionInfo, offset: u64, data: &[u8]) -> Result<(), VfioSysError> {
        self.file
            .write_all_at(data, region.offset + offset)
            .map_err(|source| VfioSysError::Region {
                what: "write",
                offset,
                len: data.len(),
                source,
            })
    }

    /// The descriptor (for mmap of a region).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
