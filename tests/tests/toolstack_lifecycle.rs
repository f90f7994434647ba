//! One guest's lifecycle on a running host, after `xl`: create from its own file, reboot,
//! orderly shutdown, destroy; block-list and network-list; `list`/`top --json`; requests to
//! different guests served side by side; finding the host by its run directory.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use splitvmm_tests::running::{child_with_arg, children_of, run, splitvmm, RunningHost};
use splitvmm_tests::wait_for;

/// A host with a driver domain and `guests` process guests, each with one disk (xvda) and
/// one interface.
fn host_file(dir: &Path, guests: &[(&str, u32)]) -> std::path::PathBuf {
    let mut text = "run_dir = \"run\"\n[driver_domain]\nname = \"driver\"\ndomid = 1\n".to_owned();
    for (name, domid) in guests {
        text.push_str(&format!(
            "[[guest]]\nname = \"{name}\"\ndomid = {domid}\n\
             [[guest.disk]]\nimage = \"{name}.img\"\nsize_mib = 2\n[[guest.nic]]\n"
        ));
    }
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn domain<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
}

#[test]
fn create_reboot_shutdown_destroy_one_guest_on_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = host_file(dir.path(), &[("guest-a", 2)]);
    let up = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let guest_file = dir.path().join("guest-c.toml");
    std::fs::write(
        &guest_file,
        "name = \"guest-c\"\ndomid = 4\n[[disk]]\nimage = \"c.img\"\nsize_mib = 2\n\
         devid = \"xvda\"\n[[nic]]\n",
    )
    .unwrap();

    // Create: its process runs, its devices are Connected.
    assert!(ok(&up.cli(&["create", guest_file.to_str().unwrap()])).contains("created guest-c"));
    let pid = child_with_arg(up.pid(), "guest-c").expect("guest-c has a process");
    let list = json(&up.cli(&["list", "--json"]));
    let c = domain(&list, "guest-c").unwrap();
    assert_eq!(
        (c["domid"].as_u64(), c["vbds"].as_u64(), c["vifs"].as_u64()),
        (Some(4), Some(1), Some(1))
    );
    let disks = json(&up.cli(&["block-list", "guest-c", "--json"]));
    let disk = &disks.as_array().unwrap()[0];
    assert_eq!(disk["vdev"], "xvda");
    assert_eq!(disk["devid"], 51712);
    assert_eq!(
        (disk["state"].as_u64(), disk["backend_state"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(disk["mode"], "w");
    let nics = json(&up.cli(&["network-list", "4", "--json"]));
    assert_eq!(nics[0]["ip"], "10.0.0.4");
    assert_eq!(nics[0]["mac"], "02:00:00:00:04:00");
    assert!(ok(&up.cli(&["block-list", "guest-c"])).contains("xvda"));
    ok(&up.cli(&["disk-check", "guest-c", "xvda", "--seed", "5"]));
    ok(&up.cli(&["net-ping", "guest-a", "0", "10.0.0.4", "--rounds", "2"]));
    // The same name or id again is refused, naming the file.
    let again = up.cli(&["create", guest_file.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("guest-c.toml"));

    // Reboot: a new process, the same devices, the data still there.
    ok(&up.cli(&["reboot", "guest-c"]));
    let new_pid = child_with_arg(up.pid(), "guest-c").expect("guest-c runs again");
    assert_ne!(pid, new_pid);
    assert!(
        kill(Pid::from_raw(pid), None).is_err(),
        "old process survived"
    );
    ok(&up.cli(&[
        "disk-check",
        "guest-c",
        "xvda",
        "--seed",
        "5",
        "--verify-only",
    ]));
    ok(&up.cli(&["net-ping", "guest-a", "0", "10.0.0.4", "--rounds", "2"]));

    // Orderly shutdown: counters reported, process gone, store entries gone.
    let said = ok(&up.cli(&["shutdown", "guest-c"]));
    assert!(said.contains("shut down guest-c"), "{said}");
    assert!(
        kill(Pid::from_raw(new_pid), None).is_err(),
        "guest-c still runs"
    );
    for gone in [
        "/local/domain/4/name",
        "/local/domain/1/backend/vbd/4/51712/state",
        "/local/domain/1/backend/vif/4/0/state",
    ] {
        assert!(
            !up.cli(&["xs", "read", gone]).status.success(),
            "{gone} survived"
        );
    }
    assert!(!up.cli(&["shutdown", "guest-c"]).status.success());
    // What the guest wrote is on the image, seen from the host.
    let mut head = [0u8; 4096];
    std::fs::File::open(dir.path().join("c.img"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head.iter().any(|&b| b != 0));
    // Its output went to its own log file.
    assert!(dir.path().join("run/logs/guest-c.log").exists());

    // The name is free again; destroy ends it at once.
    ok(&up.cli(&["create", guest_file.to_str().unwrap()]));
    ok(&up.cli(&["destroy", "guest-c"]));
    assert_eq!(children_of(up.pid()).len(), 2, "driver and guest-a");
    // guest-a never noticed.
    ok(&up.cli(&["disk-check", "guest-a", "xvda", "--seed", "6"]));

    // A guest file with a mistake names the file and the key.
    std::fs::write(
        &guest_file,
        "name = \"guest-d\"\ndomid = 5\nkernal = \"x\"\n",
    )
    .unwrap();
    let bad = up.cli(&["create", guest_file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("kernal"), "{err}");
}

#[test]
fn a_stalled_guest_holds_up_only_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let config = host_file(dir.path(), &[("guest-a", 2), ("guest-b", 3)]);
    let up = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let a = Pid::from_raw(child_with_arg(up.pid(), "guest-a").unwrap());
    kill(a, Signal::SIGSTOP).unwrap();
    // Resume guest-a whatever happens below.
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let resume = Resume(a);

    let mut slow = up
        .cmd(&["disk-check", "guest-a", "xvda", "--seed", "3"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // A request to the other guest, and a listing, are answered while guest-a's waits.
    let mut other = up
        .cmd(&["disk-check", "guest-b", "xvda", "--seed", "4"])
        .spawn()
        .unwrap();
    assert!(
        wait_for(&mut other, Duration::from_secs(20)),
        "a request to guest-b waited behind guest-a's"
    );
    assert!(other.wait().unwrap().success());
    ok(&up.cli(&["list"]));
    ok(&up.cli(&["block-list", "guest-b"]));
    assert!(
        slow.try_wait().unwrap().is_none(),
        "guest-a's request ended although guest-a is stopped"
    );
    drop(resume);
    assert!(wait_for(&mut slow, Duration::from_secs(30)));
    assert!(slow.wait().unwrap().success());
}

#[test]
fn list_and_top_for_scripts_and_the_host_found_by_its_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = host_file(dir.path(), &[("guest-a", 2), ("guest-b", 3)]);
    let run_dir = dir.path().join("run");
    let up = RunningHost::start(&config, &run_dir.join("xenstored.sock"), &[]);
    ok(&up.cli(&["disk-check", "guest-a", "xvda", "--seed", "1"]));
    ok(&up.cli(&["net-ping", "guest-a", "0", "10.0.0.3", "--rounds", "2"]));

    let list = json(&up.cli(&["list", "--json"]));
    for name in ["driver", "guest-a", "guest-b"] {
        assert!(domain(&list, name).is_some(), "{name} missing: {list}");
    }
    let a = domain(&list, "guest-a").unwrap();
    assert!(a["io"]["requests"].as_u64().unwrap() > 0, "{a}");
    assert!(a["io"]["bytes"].as_u64().unwrap() > 0, "{a}");

    // The driver domain's own per-device counters, as it publishes them (every 500 ms): it
    // saw exactly the requests guest-a counted on its one disk.
    let guest_requests = a["io"]["requests"].as_u64().unwrap();
    let guest_bytes = a["io"]["bytes"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        let list = json(&up.cli(&["list", "--json"]));
        let driver = domain(&list, "driver").unwrap().clone();
        let disk_a = driver["backend"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["kind"] == "vbd" && d["frontend"] == 2 && d["vdev"] == "xvda")
            .cloned();
        match disk_a {
            Some(d) if d["counters"]["requests"].as_u64() == Some(guest_requests) => break d,
            _ => assert!(Instant::now() < deadline, "backend counters: {driver}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let c = &served["counters"];
    assert_eq!(c["bytes"].as_u64(), Some(guest_bytes), "{served}");
    // 1 MiB written and read back by each check, at least.
    assert!(guest_bytes >= 2 << 20, "{a}");
    assert!(c["kicks"].as_u64().unwrap() > 0, "{served}");
    assert!(c["interrupts"].as_u64().unwrap() > 0, "{served}");
    assert_eq!(c["errors"].as_u64(), Some(0), "{served}");
    let disks = json(&up.cli(&["block-list", "guest-a", "--json"]));
    assert!(
        disks[0]["counters"]["requests"].as_u64() > Some(0),
        "{disks}"
    );
    // Interfaces count frames: the main job's pings went through them.
    let nics = json(&up.cli(&["network-list", "guest-a", "--json"]));
    assert!(nics[0]["counters"]["requests"].as_u64() > Some(0), "{nics}");

    // top: one JSON document per line and round; plain tables into a pipe.
    let top = ok(&up.cli(&["top", "--json", "-n", "2", "--interval", "0"]));
    assert_eq!(top.lines().count(), 2, "{top}");
    for line in top.lines() {
        let doc: Value = serde_json::from_str(line).unwrap();
        assert!(domain(&doc, "guest-b").is_some());
    }
    let plain = ok(&up.cli(&["top", "-n", "2", "--interval", "0"]));
    assert!(
        !plain.contains('\x1b'),
        "terminal codes in a pipe: {plain:?}"
    );
    assert_eq!(plain.matches("guest-a").count(), 2, "{plain}");

    // The run directory from the environment; the wrong socket is named and explained.
    let by_env = run(splitvmm().arg("list").env("SPLITVMM_RUN_DIR", &run_dir));
    assert!(ok(&by_env).contains("guest-b"));
    let toolstack = run_dir.join("toolstack.sock");
    let wrong = run(splitvmm().arg("list").arg("--store").arg(&toolstack));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(err.contains("management socket"), "{err}");
    assert!(
        err.contains(&format!("--run-dir {}", run_dir.display())),
        "{err}"
    );
    // A run directory given as --store works as --run-dir.
    ok(&run(splitvmm().arg("list").arg("--store").arg(&run_dir)));
    let nowhere = run(splitvmm()
        .arg("list")
        .arg("--run-dir")
        .arg(dir.path().join("nothing")));
    let err = String::from_utf8_lossy(&nowhere.stderr);
    assert!(
        !nowhere.status.success() && err.contains("no store at"),
        "{err}"
    );
    // A management request without a toolstack says so.
    let no_ts = run(splitvmm()
        .args(["shutdown", "guest-a", "--run-dir"])
        .arg(dir.path().join("nothing")));
    let err = String::from_utf8_lossy(&no_ts.stderr);
    assert!(
        !no_ts.status.success() && err.contains("no running toolstack"),
        "{err}"
    );
}
