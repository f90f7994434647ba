//! For the transports' unit tests: a virtio device's backend that records what a transport
//! asks of it (no vhost-user peer, no /dev/kvm).

use frontend_core::vhost_user::{FrontendSessionError, VringSetup};

use super::vhost_device::{SharedRegion, VirtioBackend, VirtioDeviceType};

/// The avail index a fake backend reports when stopped.
pub const STOPPED_AT: u32 = 7;

/// A `kind` device (a 2048-sector disk, or an interface with one queue pair) offering
/// `features` and showing `regions`; records every start.
#[derive(Debug)]
pub struct FakeBackend {
    pub kind: VirtioDeviceType,
    pub features: u64,
    pub regions: Vec<SharedRegion>,
    /// The features and first enabled queue's ring layout of every start, in order.
    pub started: Vec<(u64, VringSetup)>,
    /// Per start: which queues were enabled.
    pub enabled: Vec<Vec<bool>>,
    pub running: bool,
}

impl FakeBackend {
    /// A stopped `kind` backend offering `features` and showing `region`.
    pub fn new(kind: VirtioDeviceType, features: u64, region: SharedRegion) -> Self {
        FakeBackend {
            kind,
            features,
            regions: vec![region],
            started: Vec::new(),
            enabled: Vec::new(),
            running: false,
        }
    }
}

impl VirtioBackend for FakeBackend {
    fn device_type(&self) -> VirtioDeviceType {
        self.kind
    }
    fn num_queues(&self) -> usize {
        match self.kind {
            VirtioDeviceType::Blk => 1,
            VirtioDeviceType::Net => 2,
        }
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn config(&self) -> &[u8] {
        // capacity = 0x800 sectors
        &[0x00, 0x08, 0, 0, 0, 0, 0, 0]
    }
    fn regions(&self) -> &[SharedRegion] {
        &self.regions
    }
    fn running(&self) -> bool {
        self.running
    }
    fn start(
        &mut self,
        features: u64,
        queues: &[Option<VringSetup>],
    ) -> Result<(), FrontendSessionError> {
        if let Some(q) = queues.iter().flatten().next() {
            self.started.push((features, *q));
        }
        self.enabled
            .push(queues.iter().map(Option::is_some).collect());
        self.running = true;
        Ok(())
    }
    fn stop(&mut self) -> Result<Option<u32>, FrontendSessionError> {
        Ok(std::mem::take(&mut self.running).then_some(STOPPED_AT))
    }
}
