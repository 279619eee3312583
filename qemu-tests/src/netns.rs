//! A network namespace of the lab (`ip netns`), named `strata-lab-<pid>-<n>` so labs of one
//! or several processes run side by side, and deleted with everything still running in it.
//! Namespaces left behind by a process that died without cleaning up are removed by the
//! next lab.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use rustix::process::{kill_process, test_kill_process, Pid, Signal};

use crate::process::run;

const PREFIX: &str = "strata-lab-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop after killing every process still inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up, after removing stale lab namespaces.
    pub fn create() -> Result<Self> {
        remove_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `ip <args>` against the namespace (`ip -n <name> ...`).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread that has joined the namespace: sockets `f` creates (a
    /// `TcpStream` to the lab's server, for instance) live in the lab's network and keep
    /// working from any thread afterwards.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<R> {
                    use std::os::fd::AsFd;
                    rustix::thread::move_into_link_name_space(
                        ns.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .with_context(|| format!("joining network namespace {path}"))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "a thread in namespace {} panicked",
                        self.name
                    ))
                })
        })
    }

    /// Writes a sysctl inside the namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(self
            .command("sh")
            .args(["-c", &format!("echo {value} > {path}")]))
        .with_context(|| format!("setting {key}={value} in {}", self.name))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Kills what still runs in namespace `name` and deletes it.
fn delete(name: &str) {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", name])) {
        for pid in out
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter_map(Pid::from_raw)
        {
            let _ = kill_process(pid, Signal::KILL);
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]));
}

/// Deletes lab namespaces whose creating process no longer exists.
fn remove_stale() {
    let Ok(list) = run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        if test_kill_process(pid).is_err() {
            delete(name);
        }
    }
}
