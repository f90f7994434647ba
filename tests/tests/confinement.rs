//! Confinement of domain processes, judged from outside (issue 16): every domain process of
//! the default example runs as its own unprivileged uid, without capabilities, with
//! no_new_privs and a seccomp filter, in mount, pid, IPC and network namespaces of its own;
//! and what a confined driver domain or process guest tries against other domains is
//! denied (the probes run under exactly the confinement the binary gives itself when
//! `splitvmm up` starts it: the same plan, namespaces and start-up code).

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use control_vmm::confinement::DEFAULT_UID_BASE;
use control_vmm::supervisor::{DomainProcess, Launch};
use splitvmm_tests::running::{children_of, RunningHost};
use splitvmm_tests::workspace_bin;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The default example (README: `splitvmm up examples/process-guests.toml`), with its run
/// directory and images in `dir`.
fn default_example(dir: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/process-guests.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let images = format!("{}/", dir.display());
    let text = format!(
        "run_dir = \"{}/run\"\n{}",
        dir.display(),
        text.replace("../target/splitvmm-example/", &images)
    );
    let config = dir.join("host.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// The `Key:` line of /proc/<pid>/status, its first field.
fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn namespace(pid: &str, ns: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
}

#[test]
fn every_domain_process_of_the_default_example_is_confined() {
    if !is_root() {
        test_support::skip(
            "every_domain_process_of_the_default_example_is_confined",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = default_example(dir.path());
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let toolstack = host.pid().to_string();
    let domains = children_of(host.pid());
    let names: BTreeSet<String> = domains.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        domains.len(),
        3,
        "driver domain and two guests: {domains:?}"
    );
    assert_eq!(
        names,
        BTreeSet::from(["driver-domain".to_owned(), "process-guest".to_owned()])
    );
    let mut uids = BTreeSet::new();
    for (pid, comm) in &domains {
        let pid = *pid;
        let uid: u32 = status_field(pid, "Uid").parse().unwrap();
        assert!(uid >= DEFAULT_UID_BASE, "{comm} {pid} runs as uid {uid}");
        assert_eq!(status_field(pid, "Gid"), uid.to_string(), "{comm}: gid");
        for caps in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(pid, caps),
                "0000000000000000",
                "{comm} {pid}: {caps}"
            );
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{comm} {pid}");
        assert_eq!(status_field(pid, "Seccomp"), "2", "{comm} {pid}: a filter");
        // A peer gone mid-write is an EPIPE for that connection, never a SIGPIPE that ends
        // the domain (and every guest it serves).
        let ignored = u64::from_str_radix(&status_field(pid, "SigIgn"), 16).unwrap();
        assert_ne!(
            ignored & (1 << (libc::SIGPIPE - 1)),
            0,
            "{comm} {pid}: SIGPIPE not ignored (SigIgn {ignored:#x})"
        );
        for ns in ["pid", "mnt", "ipc", "net", "uts"] {
            assert_ne!(
                namespace(&pid.to_string(), ns),
                namespace(&toolstack, ns),
                "{comm} {pid} shares the toolstack's {ns} namespace"
            );
        }
        // Limits: no locked memory, no core dumps, a bounded number of threads.
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let limit = |name: &str| {
            let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
            let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
            (fields[0].to_owned(), fields[1].to_owned())
        };
        assert_eq!(
            limit("Max locked memory"),
            ("0".into(), "0".into()),
            "{comm}"
        );
        assert_eq!(
            limit("Max core file size"),
            ("0".into(), "0".into()),
            "{comm}"
        );
        let (soft, hard) = limit("Max processes");
        assert!(
            soft != "unlimited" && soft == hard,
            "{comm}: threads {soft}/{hard}"
        );
        // Its own root: nothing of the host's file system (the run directory, the images).
        let root = format!("/proc/{pid}/root");
        assert!(
            !Path::new(&root)
                .join(dir.path().strip_prefix("/").unwrap())
                .exists(),
            "{comm} {pid} sees the host's {}",
            dir.path().display()
        );
        uids.insert(uid);
        if comm == "driver-domain" {
            // Its queue workers (which parse guest rings) narrowed their filter once they
            // started serving: one filter more than the main thread.
            let filters = |task: &str| -> u32 {
                let status = std::fs::read_to_string(format!("{task}/status")).unwrap();
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            let main = filters(&format!("/proc/{pid}"));
            let workers: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
                .map(|t| t.path())
                .filter(|t| {
                    std::fs::read_to_string(t.join("comm"))
                        .is_ok_and(|c| c.trim() == "vring_worker")
                })
                .map(|t| filters(&t.display().to_string()))
                .collect();
            assert!(!workers.is_empty(), "no queue worker threads");
            // (A worker that has not handled an event yet has not narrowed it.)
            assert!(
                workers.contains(&(main + 1)) && workers.iter().all(|f| *f >= main),
                "worker filters {workers:?}, main thread {main}"
            );
        }
    }
    assert_eq!(uids.len(), 3, "each domain has a uid of its own: {uids:?}");
    // Two domains never share a pid namespace either.
    let pid_namespaces: BTreeSet<PathBuf> = domains
        .iter()
        .map(|(pid, _)| namespace(&pid.to_string(), "pid"))
        .collect();
    assert_eq!(pid_namespaces.len(), 3);
}

/// Runs `program args` as domain `domid` of a host would run it (the toolstack's spawn, its
/// plan), and waits for it; returns its status and output.
fn run_confined(program: &str, args: &[String], domid: u32) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let mut command = Command::new(workspace_bin(program));
    command.args(args);
    let launch = Launch {
        command,
        output: Some(std::fs::File::create(&log).unwrap()),
        cgroup: None,
        confine: Some(confine::Plan::for_domain(DEFAULT_UID_BASE, domid, vec![])),
    };
    let mut process = DomainProcess::spawn(program, launch, vec![]).unwrap();
    let pid = process.pid().unwrap();
    let status = process
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("the probe did not end");
    let out = std::fs::read_to_string(&log).unwrap();
    eprintln!("{program} (pid {pid}) {status:?}:\n{out}");
    (status, format!("pid {pid}\n{out}"))
}

/// A probe that either fails (denied) or is stopped by the seccomp filter (a socket to
/// connect with cannot even be made: socket(2) is in no allowlist).
fn assert_denied_or_killed((status, out): (ExitStatus, String)) {
    assert!(!out.contains("ALLOWED"), "{out}");
    let denied = status.code() == Some(0) && out.contains("denied");
    assert!(
        denied || status.signal() == Some(libc::SIGSYS),
        "neither denied nor killed by the filter: {status:?}\n{out}"
    );
}

fn driver_probe(probes: &[String]) -> (ExitStatus, String) {
    let mut args = vec!["confinement-probe".to_owned()];
    args.extend_from_slice(probes);
    run_confined("driver-domain", &args, 1)
}

/// Whether the kernel's audit log records a seccomp kill of `pid` (type 1326, SIGSYS).
fn audit_logged_seccomp_kill(pid: &str) -> bool {
    let Ok(out) = Command::new("dmesg").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.contains("type=1326") && l.contains(&format!(" pid={pid} ")) && l.contains("sig=31")
    })
}

#[test]
fn a_confined_driver_domain_cannot_open_images_or_read_other_processes() {
    if !is_root() {
        test_support::skip(
            "a_confined_driver_domain_cannot_open_images_or_read_other_processes",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.img");
    std::fs::write(&image, vec![7u8; 4096]).unwrap();
    // Readable by anyone on the host: only the confinement keeps the driver domain out.
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let socket = dir.path().join("store.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let me = std::process::id();
    let (status, out) = driver_probe(&[
        format!("open:{}", image.display()),
        format!("mem:{me}"),
        "open:/etc/passwd".to_owned(),
        // glibc must see ENOSYS to fall back to clone, whose flags the filter checks.
        "clone3".to_owned(),
    ]);
    assert_eq!(status.code(), Some(0), "a probe was allowed:\n{out}");
    assert_eq!(out.matches("denied").count(), 4, "{out}");
    assert!(!out.contains("ALLOWED"), "{out}");
    assert_denied_or_killed(driver_probe(&[format!("connect:{}", socket.display())]));
}

#[test]
fn a_forbidden_system_call_kills_the_driver_domain_and_is_logged() {
    if !is_root() {
        test_support::skip(
            "a_forbidden_system_call_kills_the_driver_domain_and_is_logged",
            "confined domains need root",
        );
        return;
    }
    let me = std::process::id();
    for probe in [
        "forbidden-syscall".to_owned(),
        format!("process-vm-readv:{me}"),
    ] {
        let (status, out) = driver_probe(std::slice::from_ref(&probe));
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{probe}: not killed by the filter:\n{out}"
        );
        assert!(!out.contains("ALLOWED"), "{out}");
        let pid = out.lines().next().unwrap().trim_start_matches("pid ");
        assert!(
            audit_logged_seccomp_kill(pid),
            "{probe}: no audit record of the kill of pid {pid} in dmesg"
        );
    }
}

#[test]
fn a_process_guest_cannot_reach_another_guests_files_sockets_or_memory() {
    if !is_root() {
        test_support::skip(
            "a_process_guest_cannot_reach_another_guests_files_sockets_or_memory",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = default_example(dir.path());
    let run = dir.path().join("run");
    let host = RunningHost::start(&config, &run.join("xenstored.sock"), &[]);
    let guest_b = splitvmm_tests::running::child_with_arg(host.pid(), "guest-b").unwrap();
    let driver = children_of(host.pid())
        .into_iter()
        .find(|(_, c)| c == "driver-domain")
        .unwrap()
        .0;
    // Guest A's confinement (domain 2), against guest B, the driver domain and dom0.
    let guest_a = |probes: &[String]| {
        let mut args = vec![
            "--domid".to_owned(),
            "2".to_owned(),
            "--name".to_owned(),
            "guest-a".to_owned(),
            "--confinement-probe".to_owned(),
        ];
        args.extend_from_slice(probes);
        run_confined("process-guest", &args, 2)
    };
    let (status, out) = guest_a(&[
        format!("open:{}", dir.path().join("guest-b.img").display()),
        format!("open:{}", run.join("logs/guest-b.log").display()),
        format!("mem:{guest_b}"),
        format!("mem:{driver}"),
    ]);
    assert_eq!(status.code(), Some(0), "a probe was allowed:\n{out}");
    assert_eq!(out.matches("denied").count(), 4, "{out}");
    for socket in ["xenstored.sock", "toolstack.sock"] {
        assert_denied_or_killed(guest_a(&[format!(
            "connect:{}",
            run.join(socket).display()
        )]));
    }
    // Guest B is untouched and still served.
    let list = host.cli_ok(&["list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("guest-b"));
}

#[test]
fn a_probe_without_a_plan_refuses_to_run_unconfined() {
    let out = Command::new(workspace_bin("driver-domain"))
        .args(["confinement-probe", "forbidden-syscall"])
        .env_remove(confine::plan::ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("need a plan"));
}

#[test]
fn cgroup_limits_apply_where_cgroup_v2_has_the_controllers_and_are_refused_elsewhere() {
    if !is_root() {
        test_support::skip(
            "cgroup_limits_apply_where_cgroup_v2_has_the_controllers_and_are_refused_elsewhere",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = default_example(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    // The section goes right after run_dir, before [checks] and the tables.
    let body = text.replacen(
        &format!("run_dir = \"{}/run\"\n", dir.path().display()),
        "",
        1,
    );
    std::fs::write(
        &config,
        format!(
            "run_dir = \"{}/run\"\n[confinement]\nmemory_max_mib = 256\npids_max = 200\n{body}",
            dir.path().display()
        ),
    )
    .unwrap();
    let Some(root) = confine::support::cgroup2_with_controllers() else {
        // This machine (cgroup v2 without memory and pids): refused, saying how to opt out.
        let out = splitvmm_tests::running::run(
            splitvmm_tests::running::splitvmm().arg("up").arg(&config),
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("allow_missing = [\"cgroup\"]"), "{stderr}");
        return;
    };
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let parent = root.join(format!("splitvmm-{}", host.pid()));
    for (pid, comm) in children_of(host.pid()) {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let leaf = root.join(path.trim_start_matches('/'));
        assert_eq!(leaf.parent().unwrap(), parent, "{comm} in {path}");
        let pids = std::fs::read_to_string(leaf.join("pids.max")).unwrap();
        assert_eq!(pids.trim(), "200", "{comm}");
        let memory = std::fs::read_to_string(leaf.join("memory.max")).unwrap();
        assert_eq!(memory.trim(), (256u64 << 20).to_string(), "{comm}");
    }
}

#[test]
fn confined_domains_die_with_a_killed_toolstack() {
    if !is_root() {
        test_support::skip(
            "confined_domains_die_with_a_killed_toolstack",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = default_example(dir.path());
    let mut host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let domains: Vec<i32> = children_of(host.pid())
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(domains.len(), 3);
    // Each is pid 1 of its namespace, where signals without a handler are dropped; the
    // parent-death signal (SIGKILL, sent from the parent's namespace) still reaches it.
    host.stop(nix::sys::signal::Signal::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for pid in domains {
        while Path::new(&format!("/proc/{pid}")).exists() {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                .unwrap_or(true);
            if zombie {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "domain process {pid} outlived its toolstack"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
