//! `strata nodes`: list, show, change, token, rotate-token, delete (the `/api/v1/nodes` routes).

use std::process::ExitCode;

use anyhow::Result;
use serde_json::{json, Value};

use super::client::{age, parse_version, s, table, version, Client, ClientArgs};

/// `strata nodes ...`
#[derive(Debug, clap::Args)]
pub struct NodesArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: NodesCmd,
}

#[derive(Debug, clap::Subcommand)]
enum NodesCmd {
    /// List nodes.
    List {
        /// Only this role.
        #[arg(long)]
        role: Option<String>,
    },
    /// Show one node.
    Show {
        /// MAC address.
        mac: String,
    },
    /// Change a node: name, role, site, pin, reboot.
    Set {
        /// MAC address.
        mac: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New role.
        #[arg(long)]
        role: Option<String>,
        /// New site.
        #[arg(long, conflicts_with = "no_site")]
        site: Option<String>,
        /// Remove the node from its site.
        #[arg(long)]
        no_site: bool,
        /// Pin to IMAGE@VERSION.
        #[arg(long, conflicts_with = "unpin")]
        pin: Option<String>,
        /// Follow the role (and site) again.
        #[arg(long)]
        unpin: bool,
        /// Ask the node to reboot.
        #[arg(long)]
        reboot: bool,
    },
    /// Issue a node token (printed once).
    Token {
        /// MAC address.
        mac: String,
    },
    /// Rotate the token the node's layer carries (its next node layer gets a new one; the old
    /// one works until the node first uses the new one).
    RotateToken {
        /// MAC address.
        mac: String,
    },
    /// Forget a node.
    Delete {
        /// MAC address.
        mac: String,
    },
}

fn rows(nodes: &Value) -> String {
    let rows: Vec<Vec<String>> = nodes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    vec![
                        s(&n["mac"]),
                        s(&n["name"]),
                        s(&n["role"]),
                        s(&n["site"]),
                        version(&n["effective"]),
                        n["status"]["version"]
                            .as_u64()
                            .map_or("-".into(), |v| v.to_string()),
                        format!(
                            "{}{}",
                            s(&n["state"]),
                            if n["drifted"] == true {
                                " (drifted)"
                            } else {
                                ""
                            }
                        ),
                        age(&n["last_seen_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "MAC", "NAME", "ROLE", "SITE", "ASSIGNED", "RUNNING", "STATE", "SEEN",
        ],
        &rows,
    )
}

/// Runs `strata nodes`.
pub fn run(args: NodesArgs) -> Result<ExitCode> {
    let c = Client::new(&args.client)?;
    match args.cmd {
        NodesCmd::List { role } => {
            let q = role.map(|r| format!("?role={r}")).unwrap_or_default();
            let v = c.call("GET", &format!("/api/v1/nodes{q}"), None)?;
            c.print(&v, rows);
        }
        NodesCmd::Show { mac } => {
            let v = c.call("GET", &format!("/api/v1/nodes/{mac}"), None)?;
            c.print(&v, |n| {
                let mut out = rows(&json!([n]));
                out.push_str(&format!(
                    "pin {}  stage {}  staged {}  layer bytes {}  report seq {}\n",
                    version(&n["pin"]),
                    version(&n["stage"]),
                    version(&n["staged"]),
                    n["layer_bytes"],
                    n["status"]["boot_count"]
                ));
                out
            });
        }
        NodesCmd::Set {
            mac,
            name,
            role,
            site,
            no_site,
            pin,
            unpin,
            reboot,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if let Some(r) = role {
                body.insert("role".into(), json!(r));
            }
            if let Some(s) = site {
                body.insert("site".into(), json!(s));
            } else if no_site {
                body.insert("site".into(), Value::Null);
            }
            if let Some(p) = pin {
                body.insert("pin".into(), parse_version(&p)?);
            } else if unpin {
                body.insert("pin".into(), Value::Null);
            }
            if reboot {
                body.insert("reboot".into(), json!(true));
            }
            let v = c.call(
                "PATCH",
                &format!("/api/v1/nodes/{mac}"),
                Some(&Value::Object(body)),
            )?;
            c.print(&v, |n| rows(&json!([n])));
        }
        NodesCmd::Token { mac } => {
            let v = c.call(
                "POST",
                &format!("/api/v1/nodes/{mac}/tokens"),
                Some(&json!({})),
            )?;
            c.print(&v, |t| format!("{}\n", s(&t["token"])));
        }
        NodesCmd::RotateToken { mac } => {
            let v = c.call("POST", &format!("/api/v1/nodes/{mac}/tokens/rotate"), None)?;
            c.print(&v, |t| {
                format!(
                    "token {} is generation {} of {}'s layer token\n",
                    t["id"],
                    t["layer_gen"],
                    s(&t["node"])
                )
            });
        }
        NodesCmd::Delete { mac } => {
            c.call("DELETE", &format!("/api/v1/nodes/{mac}"), None)?;
            if !c.json {
                println!("deleted {mac}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
