//! `strata roles`: list, set (version, rollout order), delete (the `/api/v1/roles` routes).

use std::process::ExitCode;

use anyhow::Result;
use serde_json::{json, Value};

use super::client::{parse_version, s, table, version, Client, ClientArgs};

/// `strata roles ...`
#[derive(Debug, clap::Args)]
pub struct RolesArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: RolesCmd,
}

#[derive(Debug, clap::Subcommand)]
enum RolesCmd {
    /// List roles in rollout order.
    List,
    /// Create or change a role.
    Set {
        /// Role name.
        name: String,
        /// The version its nodes run: IMAGE@VERSION (omit: the store's newest).
        #[arg(long)]
        version: Option<String>,
        /// Rollout order (lower goes first).
        #[arg(long, default_value_t = 0)]
        order: i64,
    },
    /// Delete a role no node uses.
    Delete {
        /// Role name.
        name: String,
    },
}

fn rows(roles: &Value) -> String {
    let rows: Vec<Vec<String>> = roles
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| vec![s(&r["name"]), version(&r["version"]), s(&r["order"])])
                .collect()
        })
        .unwrap_or_default();
    table(&["ROLE", "VERSION", "ORDER"], &rows)
}

/// Runs `strata roles`.
pub fn run(args: RolesArgs) -> Result<ExitCode> {
    let c = Client::new(&args.client)?;
    match args.cmd {
        RolesCmd::List => {
            let v = c.call("GET", "/api/v1/roles", None)?;
            c.print(&v, rows);
        }
        RolesCmd::Set {
            name,
            version,
            order,
        } => {
            let v = version.as_deref().map(parse_version).transpose()?;
            let r = c.call(
                "PUT",
                &format!("/api/v1/roles/{name}"),
                Some(&json!({ "version": v, "order": order })),
            )?;
            c.print(&r, |r| rows(&json!([r])));
        }
        RolesCmd::Delete { name } => {
            c.call("DELETE", &format!("/api/v1/roles/{name}"), None)?;
            if !c.json {
                println!("deleted role {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
