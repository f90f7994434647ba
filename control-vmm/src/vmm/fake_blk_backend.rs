//! For the transports' unit tests: a block backend that records what a transport asks of it
//! (no vhost-user peer, no /dev/kvm).

use frontend_core::vhost_user::{FrontendSessionError, VringSetup};

use super::vhost_blk::{BlkBackend, SharedRegion};

/// The avail index a fake backend reports when stopped.
pub const STOPPED_AT: u32 = 7;

/// Offers `features`, a 2048-sector disk and `regions`; records every start.
#[derive(Debug, Default)]
pub struct FakeBlkBackend {
    pub features: u64,
    pub regions: Vec<SharedRegion>,
    /// The features and ring layout of every start, in order.
    pub started: Vec<(u64, VringSetup)>,
    pub running: bool,
}

impl FakeBlkBackend {
    /// A stopped backend offering `features` and showing `region`.
    pub fn new(features: u64, region: SharedRegion) -> Self {
        FakeBlkBackend {
            features,
            regions: vec![region],
            ..Default::default()
        }
    }
}

impl BlkBackend for FakeBlkBackend {
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
    fn start(&mut self, features: u64, q: VringSetup) -> Result<(), FrontendSessionError> {
        self.started.push((features, q));
        self.running = true;
        Ok(())
    }
    fn stop(&mut self) -> Result<Option<u32>, FrontendSessionError> {
        Ok(std::mem::take(&mut self.running).then_some(STOPPED_AT))
    }
}
