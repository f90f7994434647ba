//! The command line of `l2-bench` and which `/proc/interrupts` lines belong to the disk.

use std::time::Duration;

/// Which requests a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Alternating reads and writes (the first a read).
    Mixed,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Mixed => "mixed",
        }
    }

    /// Whether request number `n` of a run is a write.
    pub fn is_write(self, n: usize) -> bool {
        match self {
            Op::Read => false,
            Op::Write => true,
            Op::Mixed => n % 2 == 1,
        }
    }
}

/// How much a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many requests.
    Requests(usize),
    /// Submit for this long, then wait for those in flight.
    Duration(Duration),
}

/// A run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub device: String,
    pub qd: usize,
    pub amount: Amount,
    pub op: Op,
    /// Random offsets start here (bytes, a multiple of 4 KiB): what lies below is kept.
    pub from: u64,
    /// An idle baseline as long as the I/O phase (else the idle marks follow at once).
    pub idle: bool,
    /// Mark the phases on the VMM's phase register (off when run outside a guest).
    pub marks: bool,
}

pub const USAGE: &str = "usage: l2-bench DEVICE QUEUE-DEPTH REQUESTS|SECONDSs \
[op=read|write|mixed] [from-mib=N] [idle=0|1] [marks=0|1]";

/// Parses the arguments after the program's name.
pub fn parse(args: &[String]) -> Result<Args, String> {
    let [device, qd, amount, rest @ ..] = args else {
        return Err(USAGE.to_string());
    };
    let qd: usize = qd
        .parse()
        .ok()
        .filter(|q| (1..=256).contains(q))
        .ok_or_else(|| format!("queue depth {qd}: 1..=256"))?;
    let amount = match amount.strip_suffix('s') {
        Some(secs) => secs
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && *s <= 3600.0)
            .map(|s| Amount::Duration(Duration::from_secs_f64(s))),
        None => amount.parse().ok().filter(|n| *n > 0).map(Amount::Requests),
    }
    .ok_or_else(|| format!("{amount}: a number of requests or of seconds (3s)"))?;
    let mut out = Args {
        device: device.clone(),
        qd,
        amount,
        op: Op::Mixed,
        from: 0,
        idle: true,
        marks: true,
    };
    for kv in rest {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv}: not KEY=VALUE ({USAGE})"))?;
        let flag = || match v {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(format!("{kv}: 0 or 1")),
        };
        match k {
            "op" => {
                out.op = match v {
                    "read" => Op::Read,
                    "write" => Op::Write,
                    "mixed" => Op::Mixed,
                    _ => return Err(format!("{kv}: read, write or mixed")),
                }
            }
            "from-mib" => {
                out.from = v
                    .parse::<u64>()
                    .ok()
                    .and_then(|m| m.checked_mul(1 << 20))
                    .ok_or_else(|| format!("{kv}: a number of MiB"))?
            }
            "idle" => out.idle = flag()?,
            "marks" => out.marks = flag()?,
            _ => return Err(format!("{kv}: unknown ({USAGE})")),
        }
    }
    Ok(out)
}

/// Whether a `/proc/interrupts` line counts the request completions of `device` (a path
/// such as `/dev/vda` or `/dev/nvme1n1`): virtio-blk's `virtio<N>-req.<Q>` vectors (the
/// guest has one virtio disk), an NVMe controller's I/O queue vectors `nvme<C>q<Q>` with
/// Q >= 1 (not the admin queue `q0`).
pub fn is_disk_interrupt(device: &str, line: &str) -> bool {
    let name = device.rsplit('/').next().unwrap_or(device);
    let Some(last) = line.split_whitespace().last() else {
        return false;
    };
    if name.starts_with("vd") {
        return last.starts_with("virtio") && last.contains("-req.");
    }
    let Some(ctrl) = name
        .strip_prefix("nvme")
        .and_then(|r| r.split_once('n'))
        .map(|(c, _)| c)
    else {
        return false;
    };
    last.strip_prefix("nvme")
        .and_then(|r| r.strip_prefix(ctrl))
        .and_then(|r| r.strip_prefix('q'))
        .is_some_and(|q| !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit()) && q != "0")
}

/// The interrupts of `device` in a `/proc/interrupts` text (every CPU's column summed).
pub fn disk_interrupts(device: &str, text: &str) -> u64 {
    text.lines()
        .filter(|l| is_disk_interrupt(device, l))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_old_form_is_a_mixed_run_with_its_idle_baseline() {
        let a = parse(&v("/dev/vda 32 1600")).unwrap();
        assert_eq!(a.qd, 32);
        assert_eq!(a.amount, Amount::Requests(1600));
        assert_eq!((a.op, a.from, a.idle, a.marks), (Op::Mixed, 0, true, true));
    }

    #[test]
    fn a_timed_run_with_options() {
        let a = parse(&v(
            "/dev/nvme0n1 1 2.5s op=write from-mib=16 idle=0 marks=0",
        ))
        .unwrap();
        assert_eq!(a.amount, Amount::Duration(Duration::from_millis(2500)));
        assert_eq!(
            (a.op, a.from, a.idle, a.marks),
            (Op::Write, 16 << 20, false, false)
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            "/dev/vda 0 10",
            "/dev/vda 257 10",
            "/dev/vda 1 0",
            "/dev/vda 1 xs",
            "/dev/vda 1 0s",
            "/dev/vda 1 10 op=trim",
            "/dev/vda 1 10 idle=2",
            "/dev/vda 1 10 from-mib=99999999999999999",
            "/dev/vda 1 10 colour=red",
            "/dev/vda 1",
        ] {
            assert!(parse(&v(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn mixed_alternates_starting_with_a_read() {
        assert!(!Op::Mixed.is_write(0) && Op::Mixed.is_write(1));
        assert!(Op::Write.is_write(0) && !Op::Read.is_write(1));
    }

    const INTERRUPTS: &str = "           CPU0       CPU1
  0:         45          0   IO-APIC    2-edge      timer
 24:          3          1   PCI-MSI 65536-edge      nvme0q0
 25:        100         20   PCI-MSI 65537-edge      nvme0q1
 26:          5          0   PCI-MSI 65538-edge      nvme0q12
 27:          9          0   PCI-MSI 98304-edge      nvme1q1
 28:          7          0   PCI-MSI 81920-edge      virtio0-config
 29:         11          2   PCI-MSI 81921-edge      virtio0-req.0
LOC:        999        999   Local timer interrupts
";

    #[test]
    fn only_the_devices_io_queue_vectors_count() {
        assert_eq!(disk_interrupts("/dev/nvme0n1", INTERRUPTS), 125);
        assert_eq!(disk_interrupts("/dev/nvme1n1", INTERRUPTS), 9);
        assert_eq!(disk_interrupts("/dev/vda", INTERRUPTS), 13);
        assert_eq!(disk_interrupts("/dev/sda", INTERRUPTS), 0);
    }
}
