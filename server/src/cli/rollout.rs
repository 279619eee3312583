//! `strata rollout`: plan, approve, apply, pause, resume, abort, list, show, events.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::client::{parse_version, s, table, version, Client, ClientArgs};

/// `strata rollout ...`
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: RolloutCmd,
}

#[derive(Debug, clap::Subcommand)]
enum RolloutCmd {
    /// Plan a rollout and print its waves and digest (nothing changes until approve + apply).
    Plan {
        /// ROLE=IMAGE@VERSION, once per role.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Nodes in each role's canary wave.
        #[arg(long, default_value_t = 1)]
        canary: usize,
        /// Nodes per batch.
        #[arg(long, default_value_t = 10)]
        batch: usize,
        /// Most nodes of a wave rebooting at once.
        #[arg(long, default_value_t = 1)]
        max_unavailable: usize,
        /// Seconds a group gets to report healthy.
        #[arg(long, default_value_t = 600)]
        health_timeout: u64,
        /// Seconds a wave gets to stage.
        #[arg(long, default_value_t = 3600)]
        stage_timeout: u64,
    },
    /// Approve a plan, quoting the digest `plan` printed.
    Approve {
        /// Rollout id.
        id: u64,
        /// The plan's digest.
        #[arg(long)]
        digest: String,
    },
    /// Start an approved rollout.
    Apply {
        /// Rollout id.
        id: u64,
    },
    /// Pause.
    Pause {
        /// Rollout id.
        id: u64,
    },
    /// Resume.
    Resume {
        /// Rollout id.
        id: u64,
    },
    /// Abort (the current wave rolls back).
    Abort {
        /// Rollout id.
        id: u64,
    },
    /// List rollouts.
    List,
    /// Show a rollout: plan, progress, lease.
    Show {
        /// Rollout id.
        id: u64,
    },
    /// The event log.
    Events {
        /// Only events after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only kinds starting with this (e.g. `rollout.`, `node.illegal`).
        #[arg(long)]
        kind: Option<String>,
        /// Only this subject (e.g. `rollout/3`, `node/52:54:00:00:00:01`).
        #[arg(long)]
        subject: Option<String>,
    },
}

fn summary(r: &Value) -> String {
    let mut out = format!(
        "rollout {}  {}  wave {}/{}  phase {}{}\ndigest {}\n",
        r["id"],
        s(&r["state"]),
        r["progress"]["wave"],
        r["plan"]["waves"].as_array().map_or(0, Vec::len),
        s(&r["progress"]["phase"]),
        r["reason"]
            .as_str()
            .map(|x| format!("  ({x})"))
            .unwrap_or_default(),
        s(&r["digest"]),
    );
    if let Some(l) = r["lease"].as_object() {
        out.push_str(&format!(
            "lease {} token {}\n",
            s(&l["holder"].clone()),
            l["token"].clone()
        ));
    }
    let rows: Vec<Vec<String>> = r["plan"]["waves"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let nodes = w["nodes"].as_array().map_or(0, Vec::len);
                    let groups = w["groups"].as_array().map_or(0, Vec::len);
                    let to = r["plan"]["roles"]
                        .as_array()
                        .and_then(|rs| rs.iter().find(|x| x["role"] == w["role"]))
                        .map(|x| version(&x["to"]))
                        .unwrap_or_default();
                    vec![
                        s(&w["index"]),
                        s(&w["role"]),
                        s(&w["kind"]),
                        nodes.to_string(),
                        groups.to_string(),
                        to,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &["WAVE", "ROLE", "KIND", "NODES", "GROUPS", "TO"],
        &rows,
    ));
    if let Some(sk) = r["plan"]["skipped"].as_array().filter(|a| !a.is_empty()) {
        out.push_str(&format!(
            "{} node(s) skipped (already on the target)\n",
            sk.len()
        ));
    }
    out
}

/// Runs `strata rollout`.
pub fn run(args: RolloutArgs) -> Result<ExitCode> {
    let c = Client::new(&args.client)?;
    let act = |id: u64, what: &str, body: Value| -> Result<()> {
        let r = c.call(
            "POST",
            &format!("/api/v1/rollouts/{id}/{what}"),
            Some(&body),
        )?;
        c.print(&r, summary);
        Ok(())
    };
    match args.cmd {
        RolloutCmd::Plan {
            roles,
            canary,
            batch,
            max_unavailable,
            health_timeout,
            stage_timeout,
        } => {
            let mut targets = Vec::new();
            for r in &roles {
                let (role, v) = r
                    .split_once('=')
                    .with_context(|| format!("--role {r:?}: expected ROLE=IMAGE@VERSION"))?;
                targets.push(json!({ "role": role, "to": parse_version(v)? }));
            }
            let spec = json!({
                "roles": targets, "canary": canary, "batch_size": batch, "max_unavailable": max_unavailable,
                "health_timeout_secs": health_timeout, "stage_timeout_secs": stage_timeout,
            });
            let r = c.call("POST", "/api/v1/rollouts", Some(&spec))?;
            c.print(&r, |r| {
                format!(
                    "{}approve with: strata rollout approve {} --digest {}\n",
                    summary(r),
                    r["id"],
                    s(&r["digest"])
                )
            });
        }
        RolloutCmd::Approve { id, digest } => act(id, "approve", json!({ "digest": digest }))?,
        RolloutCmd::Apply { id } => act(id, "apply", json!({}))?,
        RolloutCmd::Pause { id } => act(id, "pause", json!({}))?,
        RolloutCmd::Resume { id } => act(id, "resume", json!({}))?,
        RolloutCmd::Abort { id } => act(id, "abort", json!({}))?,
        RolloutCmd::List => {
            let v = c.call("GET", "/api/v1/rollouts", None)?;
            c.print(&v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| {
                                let roles: Vec<String> = r["plan"]["roles"]
                                    .as_array()
                                    .map(|rs| {
                                        rs.iter()
                                            .map(|x| {
                                                format!("{}→{}", s(&x["role"]), version(&x["to"]))
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                vec![
                                    s(&r["id"]),
                                    s(&r["state"]),
                                    format!(
                                        "{}/{}",
                                        r["progress"]["wave"],
                                        r["plan"]["waves"].as_array().map_or(0, Vec::len)
                                    ),
                                    roles.join(" "),
                                    s(&r["reason"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["ID", "STATE", "WAVE", "ROLES", "REASON"], &rows)
            });
        }
        RolloutCmd::Show { id } => {
            let r = c.call("GET", &format!("/api/v1/rollouts/{id}"), None)?;
            c.print(&r, summary);
        }
        RolloutCmd::Events {
            after,
            kind,
            subject,
        } => {
            let mut q = format!("?after={after}");
            if let Some(k) = kind {
                q.push_str(&format!("&kind={k}"));
            }
            if let Some(sj) = subject {
                q.push_str(&format!("&subject={sj}"));
            }
            let v = c.call("GET", &format!("/api/v1/events{q}"), None)?;
            c.print(&v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|e| {
                                vec![
                                    s(&e["id"]),
                                    s(&e["kind"]),
                                    s(&e["subject"]),
                                    s(&e["actor"]),
                                    e["detail"].to_string(),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["ID", "KIND", "SUBJECT", "ACTOR", "DETAIL"], &rows)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
