//! Child processes of the lab, each the leader of its own process group, so that stopping
//! one stops everything it started (QEMU helpers, a server's workers) and nothing leaks.

use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::{kill_process_group, Pid, Signal};

use crate::log::LogStream;

/// How long a process gets to exit after SIGTERM before its group is sent SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A running child in its own process group; stopped (group-wide) on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` as the leader of a new process group. Its stdout and stderr go, merged,
    /// into a [`LogStream`] copied to `log_path`; stdin is /dev/null.
    pub fn spawn_logged(
        name: &str,
        mut cmd: Command,
        log_path: &Path,
        echo: Option<String>,
    ) -> Result<(Self, LogStream)> {
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        let writer2 = writer.try_clone().context("duplicating a pipe")?;
        cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
        let proc = Self::spawn(name, cmd)?;
        let log = LogStream::capture(name, reader, log_path, echo)?;
        Ok((proc, log))
    }

    /// Spawns `cmd` (stdio as configured by the caller) as a new process group leader.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow::anyhow!(
                    "{name}: {program} not found: {}",
                    crate::tools::hint(&program)
                )
            } else {
                anyhow::Error::new(e).context(format!("{name}: starting {program}"))
            }
        })?;
        // `cmd` (and with it the parent's copies of the pipe's write ends) drops here, so the
        // log reader sees end-of-file when the child exits.
        drop(cmd);
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
        })
    }

    /// The process's name in logs and errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mutable access to the child (its stdin, for instance).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal_group(&self, sig: Signal) {
        let Ok(raw) = i32::try_from(self.child.id()) else {
            return;
        };
        if let Some(pid) = Pid::from_raw(raw) {
            // ESRCH (already gone) is the expected outcome of a second signal.
            let _ = kill_process_group(pid, sig);
        }
    }

    /// Stops the whole process group: SIGTERM, then SIGKILL after a grace period. Returns the
    /// leader's exit status. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.try_wait() {
            // The leader is gone; its group may still hold children.
            self.signal_group(Signal::KILL);
            return Some(s);
        }
        self.signal_group(Signal::TERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.try_wait() {
                self.signal_group(Signal::KILL);
                return Some(s);
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    /// Kills the whole process group at once (SIGKILL) and reaps the leader.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.signal_group(Signal::KILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short command to completion; fails with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            anyhow::anyhow!("{program} not found: {}", crate::tools::hint(&program))
        } else {
            anyhow::Error::new(e).context(format!("running {shown}"))
        }
    })?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
