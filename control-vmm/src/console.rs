//! `splitvmm console DOMAIN`: a domain's output as `splitvmm up` logs it
//! (`<run_dir>/logs/<name>.log`): a KVM guest's serial console and its VMM's log lines, a
//! process domain's log lines; printed and followed like `tail -f`. Read-only: the tiny
//! guest takes no console input.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::is_valid_name;
use crate::host::log_path;

/// Prints the console log of `domain`; with `follow`, keeps printing what is appended until
/// interrupted.
pub fn show(run_dir: &Path, domain: &str, follow: bool) -> Result<ExitCode> {
    if !is_valid_name(domain) {
        bail!("{domain:?} is not a domain name");
    }
    let path = log_path(run_dir, domain);
    let mut file = std::fs::File::open(&path).with_context(|| {
        format!(
            "no log for {domain} at {} (is it a domain of the host in {}? Pass --run-dir)",
            path.display(),
            run_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        // A log truncated under us (a new run) starts over.
        let len = file.metadata()?.len();
        if file.stream_position()? > len {
            file.seek(SeekFrom::Start(0))?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
