//! The virtio-blk backend device ([`BlkBackendDevice`], a [`BackendDevice`] any transport can
//! serve): configuration space, features, the in-flight log and the worker layout. Each of its
//! virtqueues is processed by a [`BlkBackendQueue`] ([`super::queue`]). Queues are spread over
//! at most `min(num_queues, cores)` workers.

use std::fs::File;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::config::CacheMode;
use super::config::{BlkBackendConfig, BlkConfigSpace};
use super::disk::BlkDisk;
use super::inflight::{queue_region_len, InflightError, InflightLog};
use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::memory::SealPolicy;
use crate::virtio_core::{
    sync, BackendDevice, InflightSetupError, InflightTracking, QueueProgress,
};

use super::queue::{BlkBackendError, BlkBackendQueue};

/// A virtio-blk device on one disk: its queues, configuration space and worker layout.
#[derive(Debug)]
pub struct BlkBackendDevice {
    cfg: BlkBackendConfig,
    features: u64,
    config_space: BlkConfigSpace,
    queues: Vec<Mutex<BlkBackendQueue>>,
    /// Queue indexes served by each worker, in queue order.
    workers: Vec<Vec<usize>>,
    /// The log the queues write, once a frontend asked for one or handed one back.
    inflight: Mutex<Option<InflightLog>>,
}

impl BlkBackendDevice {
    /// A device on `disk` with options `cfg`.
    pub fn new(disk: Arc<BlkDisk>, cfg: BlkBackendConfig) -> Result<Self, BlkBackendError> {
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(BlkBackendError::Config("queues must be 1..=64"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(BlkBackendError::Config(
                "queue size must be a power of two <= 32768",
            ));
        }
        if cfg.cache == CacheMode::None
            && disk.file().is_some()
            && disk.direct_block_size().is_none()
        {
            return Err(BlkBackendError::Config(
                "cache = none needs the image opened with O_DIRECT",
            ));
        }
        let queues = (0..cfg.num_queues)
            .map(|q| Mutex::new(BlkBackendQueue::new(q, disk.clone(), &cfg, None)))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nworkers = usize::from(cfg.num_queues).min(cores).max(1);
        let mut workers = vec![Vec::new(); nworkers];
        for q in 0..usize::from(cfg.num_queues) {
            workers[q % nworkers].push(q);
        }
        Ok(BlkBackendDevice {
            features: cfg.features(disk.read_only()),
            config_space: BlkConfigSpace::new(
                &cfg,
                disk.capacity_sectors(),
                disk.direct_block_size()
                    .and_then(|b| u32::try_from(b).ok())
                    .unwrap_or(512),
            ),
            cfg,
            queues,
            workers,
            inflight: Mutex::new(None),
        })
    }

    /// The memfd of the in-flight log the queues write now, if a frontend asked for one or
    /// handed one back.
    pub fn inflight_file(&self) -> Option<std::io::Result<File>> {
        sync::lock(&self.inflight)
            .as_ref()
            .map(|log| log.file().try_clone())
    }

    /// Checks a log shape a frontend asks for: 1..=queues, a power of two up to the maximum.
    fn check_shape(&self, num_queues: u16, queue_size: u16) -> Result<(), BlkBackendError> {
        let fits = (1..=self.queues.len()).contains(&usize::from(num_queues))
            && queue_size.is_power_of_two()
            && queue_size <= self.cfg.queue_size;
        if fits {
            Ok(())
        } else {
            Err(BlkBackendError::InflightShape(
                num_queues,
                queue_size,
                self.queues.len(),
                self.cfg.queue_size,
            ))
        }
    }

    /// Makes `log` the one the first `num_queues` queues write.
    fn install(&self, log: InflightLog, num_queues: u16) -> Result<(), BlkBackendError> {
        for (q, queue) in self.queues.iter().enumerate().take(usize::from(num_queues)) {
            let index = u16::try_from(q).map_err(|_| BlkBackendError::Config("queue index"))?;
            let iq = log
                .queue(index)
                .ok_or(BlkBackendError::Config("in-flight log too small"))?;
            sync::lock(queue).set_inflight(iq);
        }
        *sync::lock(&self.inflight) = Some(log);
        Ok(())
    }
}

impl InflightTracking for BlkBackendDevice {
    fn new_log(&self, num_queues: u16, queue_size: u16) -> Result<(File, u64), InflightSetupError> {
        self.check_shape(num_queues, queue_size)?;
        let log = InflightLog::new(num_queues, queue_size).map_err(BlkBackendError::InflightLog)?;
        let file = log.file().try_clone()?;
        let len = file.metadata()?.len();
        self.install(log, num_queues)?;
        Ok((file, len))
    }

    fn adopt_log(
        &self,
        file: File,
        (offset, size): (u64, u64),
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), InflightSetupError> {
        self.check_shape(num_queues, queue_size)?;
        let needed = queue_region_len(queue_size) * u64::from(num_queues);
        if size < needed {
            return Err(BlkBackendError::InflightLog(InflightError::Layout(format!(
                "{size} bytes at offset {offset}; {needed} needed"
            )))
            .into());
        }
        let log = InflightLog::adopt(file, offset, (num_queues, queue_size), self.cfg.seal_policy)
            .map_err(BlkBackendError::InflightLog)?;
        self.install(log, num_queues)?;
        Ok(())
    }

    fn resume_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, InflightSetupError> {
        match self.queues.get(index) {
            Some(q) => Ok(sync::lock(q).resume(queue, mem)?),
            None => Ok(0),
        }
    }
}

impl BackendDevice for BlkBackendDevice {
    type QueueError = BlkBackendError;

    fn counters(&self) -> Option<&DeviceCounters> {
        Some(&self.cfg.counters)
    }

    fn name(&self) -> &str {
        "blk"
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space.read(offset, size)
    }

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn seal_policy(&self) -> SealPolicy {
        self.cfg.seal_policy
    }

    fn memory_grant(&self) -> crate::virtio_core::MemoryGrant {
        self.cfg.grant
    }

    fn queue_workers(&self) -> Vec<Vec<usize>> {
        self.workers.clone()
    }

    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, BlkBackendError> {
        let Some(q) = self.queues.get(index) else {
            return Ok(QueueProgress::default());
        };
        let mut q = sync::lock(q);
        let resubmitted = q.resubmit_pending(queue, mem)?;
        let mut progress = q.process(queue, mem)?;
        progress.completed += resubmitted.completed;
        progress.notify |= resubmitted.notify;
        Ok(progress)
    }

    fn inflight(&self) -> Option<&dyn InflightTracking> {
        Some(self)
    }

    fn reset_queue(&self, index: usize) {
        if let Some(q) = self.queues.get(index) {
            sync::lock(q).reset();
        }
    }
}
