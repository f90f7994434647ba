//! Store throughput: reads/s and writes/s over 1 and 16 connections (one
//! request in flight per connection), against an echo-server floor measured in
//! the same run: a single-threaded epoll server that decodes the same framing
//! and answers each request with a reply of the same size, doing no store work.
//!
//! `cargo run --release -p splitvmm-tests --bin store-bench -- --seconds 3`

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn, StoreConfig};
use ipc::xenstore::wire::{Decoder, Message, MsgType};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

#[derive(Parser)]
#[command(about = "xenstore throughput against an echo-server floor")]
struct Args {
    /// Seconds per server and cell (4 cells, store and echo each).
    #[arg(long, default_value_t = 2)]
    seconds: u64,
}

const VALUE: &[u8] = b"0123456789abcdef0123456789abcdef";

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
}

/// Runs `conns` clients, each doing `op` back to back for `secs`; returns (ops, seconds).
fn measure(path: &Path, op: Op, conns: usize, secs: f64) -> Result<(u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..conns {
        let mut c = StoreClient::connect(path).context("connect")?;
        let key = format!("/bench/c{i}");
        c.write(&key, VALUE)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || -> Result<u64> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match op {
                    Op::Read => {
                        c.read(&key)?;
                    }
                    Op::Write => c.write(&key, VALUE)?,
                }
                n += 1;
            }
            Ok(n)
        }));
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// Store and echo ops/s for one cell, measured in alternating half-second
/// slices so that load from elsewhere on the machine hits both alike.
fn cell(store: &Path, echo: &Path, op: Op, conns: usize, secs: u64) -> Result<(f64, f64)> {
    let (mut s_ops, mut s_t, mut e_ops, mut e_t) = (0, 0.0, 0, 0.0);
    for _ in 0..(secs * 2).max(1) {
        let (o, t) = measure(store, op, conns, 0.5)?;
        s_ops += o;
        s_t += t;
        let (o, t) = measure(echo, op, conns, 0.5)?;
        e_ops += o;
        e_t += t;
    }
    Ok((s_ops as f64 / s_t, e_ops as f64 / e_t))
}

/// The floor: answers READ with the value and anything else with `OK\0`.
fn echo_server(listener: UnixListener, stop: Arc<AtomicBool>) -> Result<()> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new(EpollCreateFlags::empty())?;
    epoll.add(listener.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
    let mut conns: HashMap<u64, (UnixStream, Decoder)> = HashMap::new();
    let mut next = 1u64;
    let mut events = vec![EpollEvent::empty(); 64];
    let mut buf = vec![0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        let n = epoll.wait(&mut events, 100u16)?;
        for ev in &events[..n] {
            let token = ev.data();
            if token == 0 {
                while let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(true)?;
                    epoll.add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, next))?;
                    conns.insert(next, (s, Decoder::new()));
                    next += 1;
                }
                continue;
            }
            let Some((s, dec)) = conns.get_mut(&token) else {
                continue;
            };
            let got = match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    conns.remove(&token);
                    continue;
                }
                Ok(n) => n,
            };
            let mut out = Vec::new();
            for m in dec.decode_all(&buf[..got])? {
                let payload = if m.ty == MsgType::Read {
                    VALUE.to_vec()
                } else {
                    b"OK\0".to_vec()
                };
                Message::new(m.ty, m.req_id, m.tx_id, payload).encode_into(&mut out);
            }
            // Replies are small and one request is in flight, so the socket buffer
            // has room; fall back to a blocking write if it ever does not.
            let mut sent = 0;
            while sent < out.len() {
                match s.write(&out[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        s.set_nonblocking(false)?;
                        s.write_all(&out[sent..])?;
                        s.set_nonblocking(true)?;
                        sent = out.len();
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("store.sock");
    let echo_path: PathBuf = dir.path().join("echo.sock");
    let (handle, store_thread) = spawn(StoreConfig::new(&store_path))?;
    let stop = Arc::new(AtomicBool::new(false));
    let listener = UnixListener::bind(&echo_path)?;
    let echo_stop = stop.clone();
    let echo_thread = std::thread::spawn(move || echo_server(listener, echo_stop));

    println!(
        "store-bench: {} s per cell, value {} bytes, one request in flight per connection",
        args.seconds,
        VALUE.len()
    );
    println!("| operation | connections | store ops/s | echo floor ops/s | store/echo |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (op, name) in [(Op::Read, "read"), (Op::Write, "write")] {
        for conns in [1usize, 16] {
            let (store, echo) = cell(&store_path, &echo_path, op, conns, args.seconds)?;
            println!(
                "| {name} | {conns} | {store:.0} | {echo:.0} | {:.2} |",
                store / echo
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    handle.shutdown();
    store_thread
        .join()
        .map_err(|_| anyhow::anyhow!("store thread panicked"))??;
    echo_thread
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(())
}
