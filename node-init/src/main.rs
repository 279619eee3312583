//! node-init: PID 1 of the Strata boot initramfs (and, as `node-init agent ...`, the agent
//! inside the booted image). As PID 1 it never exits: every failure becomes a
//! [`Fallback`] decision, a panic becomes "boot last known good", and a second failure in
//! that mode reboots. The kernel command line carries `panic=10` as the last safety net.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Duration;

use node_init::boot::{self, Env, Fallback, Mode};
use node_init::sys::process;
use node_init::{fetch, marker};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("agent") {
        return match node_init::agent::main(args.get(2..).unwrap_or_default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("node-init agent: {}", fetch::chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if process::getpid() != 1 {
        eprintln!("node-init runs as PID 1 of the Strata initramfs, or as `node-init agent ...`");
        return ExitCode::FAILURE;
    }
    pid1()
}

fn pid1() -> ! {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        marker!("panic {msg}");
    }));
    let mut env = Env::default();
    let mut mode = Mode::Normal;
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| boot::run(&mut env, mode)));
        let fallback = match outcome {
            Ok(Ok(never)) => match never {},
            Ok(Err(e)) => {
                marker!("error={} {}", e.kind(), fetch::chain(&e));
                Fallback::from(&e)
            }
            Err(_) => Fallback::BootLastKnownGood,
        };
        // Last known good already failed once: do not loop on it.
        let fallback = match (mode, fallback) {
            (Mode::LastKnownGood, Fallback::BootLastKnownGood) => {
                Fallback::RebootAfter(Duration::from_secs(10))
            }
            (_, f) => f,
        };
        marker!("fallback={fallback}");
        process::reap_zombies();
        match fallback {
            Fallback::BootLastKnownGood => mode = Mode::LastKnownGood,
            Fallback::RetryAfter(d) => {
                std::thread::sleep(d);
                mode = Mode::Normal;
            }
            Fallback::RebootAfter(d) => {
                std::thread::sleep(d);
                let e = process::reboot();
                marker!("error=reboot {e}");
                // Nothing else to do: wait for the kernel's panic timer or an operator.
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                    process::reap_zombies();
                }
            }
        }
    }
}
