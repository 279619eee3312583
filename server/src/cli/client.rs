//! The API client behind `strata nodes|roles|rollout`: `--url`/`STRATA_URL` (default
//! `http://127.0.0.1:8080`), `--token`/`STRATA_TOKEN` (default: the admin token `strata serve`
//! wrote to `./strata-data/admin.token`, if present), `--json` for machine output.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Connection options every API subcommand takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(
        long,
        env = "STRATA_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Bearer token (default: ./strata-data/admin.token).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A blocking-style client (one current-thread runtime per command).
pub struct Client {
    url: String,
    token: Option<String>,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    /// JSON output.
    pub json: bool,
}

impl Client {
    /// A client from the command line.
    pub fn new(args: &ClientArgs) -> Result<Client> {
        let token = match &args.token {
            Some(t) => Some(t.trim().to_owned()),
            None => std::fs::read_to_string("strata-data/admin.token")
                .ok()
                .map(|t| t.trim().to_owned()),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("HTTP client")?;
        Ok(Client {
            url: args.url.trim_end_matches('/').to_owned(),
            token,
            http,
            rt,
            json: args.json,
        })
    }

    /// Calls the API; a non-2xx answer becomes an error carrying the server's message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).context("method")?;
        let mut req = self.http.request(m, format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let url = format!("{} {}{path}", method, self.url);
        self.rt.block_on(async move {
            let resp = req
                .send()
                .await
                .with_context(|| format!("{url}: cannot reach the server"))?;
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .with_context(|| format!("{url}: reading the answer"))?;
            let v: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            };
            if !status.is_success() {
                let msg = v["error"]["message"].as_str().unwrap_or("no message");
                let code = v["error"]["code"].as_str().unwrap_or("error");
                bail!("{url}: HTTP {}: {code}: {msg}", status.as_u16());
            }
            Ok(v)
        })
    }

    /// Prints `v` as JSON, or `table` otherwise.
    pub fn print(&self, v: &Value, table: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", table(v));
        }
    }
}

/// Formats rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// `img@2` of a version object, `-` for null.
pub fn version(v: &Value) -> String {
    match (v["image"].as_str(), v["version"].as_u64()) {
        (Some(i), Some(n)) => format!("{i}@{n}"),
        _ => "-".into(),
    }
}

/// Parses `image@version`.
pub fn parse_version(text: &str) -> Result<Value> {
    let (image, v) = text
        .split_once('@')
        .with_context(|| format!("{text:?}: expected IMAGE@VERSION"))?;
    let v: u64 = v
        .parse()
        .with_context(|| format!("{text:?}: version is not a number"))?;
    Ok(serde_json::json!({ "image": image, "version": v }))
}

/// A string field or `-`.
pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Milliseconds since the epoch as an age ("12s ago").
pub fn age(ms: &Value) -> String {
    let Some(ms) = ms.as_u64().filter(|&m| m > 0) else {
        return "never".into();
    };
    let now = crate::db::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}
