//! The appliance's configuration: one TOML file plus command-line overrides. Every key has a
//! default, so `strata serve` with no file runs the appliance with its embedded defaults
//! (HTTP and TFTP on all addresses, DHCP off: answering DHCP on a network that already has a
//! DHCP server is something an operator must ask for).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// The values are individually fine but do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the image store, catalog, keys and leases live.
    pub data_dir: PathBuf,
    /// HTTP: iPXE scripts, kernels, initramfs, layers, the API.
    pub http: HttpConfig,
    /// TFTP, for PXE ROMs that need an iPXE binary first.
    pub tftp: TftpConfig,
    /// DHCP and proxyDHCP.
    pub dhcp: DhcpConfig,
    /// Router advertisements that end iPXE's IPv6 wait.
    pub ra: RaConfig,
    /// What booting nodes get.
    pub boot: BootConfig,
    /// Rollout driver and node-fact timings.
    pub orchestrator: OrchestratorConfig,
    /// The iSCSI target for diskless nodes.
    pub iscsi: IscsiConfig,
    /// Multicast sessions offered in manifests.
    pub multicast: crate::multicast::MulticastConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("strata-data"),
            http: HttpConfig::default(),
            tftp: TftpConfig::default(),
            dhcp: DhcpConfig::default(),
            ra: RaConfig::default(),
            boot: BootConfig::default(),
            orchestrator: OrchestratorConfig::default(),
            iscsi: IscsiConfig::default(),
            multicast: crate::multicast::MulticastConfig::default(),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The URL nodes use to reach this server (put in iPXE scripts, DHCP answers and kernel
    /// command lines). Default: `http://<dhcp.server_ip or the listen address>:<port>`.
    pub public_url: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            public_url: None,
        }
    }
}

/// `[tftp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Serve TFTP at all.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The TFTP root. Default: Debian's iPXE binaries (`/usr/lib/ipxe`).
    pub root: PathBuf,
    /// Largest window granted, in payload bytes (windowsize × blksize; RFC 7440). Default
    /// 1 MiB; lower it for clients that ask for larger windows than their receive buffer holds.
    pub max_window_bytes: u32,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 69)),
            root: PathBuf::from("/usr/lib/ipxe"),
            max_window_bytes: crate::boot::tftp::server::DEFAULT_MAX_WINDOW_BYTES,
        }
    }
}

/// How the DHCP service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// No DHCP service.
    Off,
    /// A full DHCP server: addresses from a pool and reservations, plus boot information.
    Full,
    /// proxyDHCP: boot information only, beside the site's own DHCP server.
    Proxy,
}

/// `[dhcp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// `off`, `full` or `proxy`.
    pub mode: DhcpMode,
    /// The interface to serve on (required unless `mode = "off"`).
    pub interface: Option<String>,
    /// This server's address on that interface (siaddr, server identifier, next-server).
    pub server_ip: Option<Ipv4Addr>,
    /// First address of the pool (full mode).
    pub pool_start: Option<Ipv4Addr>,
    /// Last address of the pool (full mode).
    pub pool_end: Option<Ipv4Addr>,
    /// Subnet mask handed out (full mode).
    pub netmask: Ipv4Addr,
    /// Default router handed out, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers handed out.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// Fixed addresses per MAC.
    pub reservations: Vec<Reservation>,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            mode: DhcpMode::Off,
            interface: None,
            server_ip: None,
            pool_start: None,
            pool_end: None,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: Vec::new(),
            lease_secs: 3600,
            reservations: Vec::new(),
        }
    }
}

/// A fixed address for one MAC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// The client's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Optional host name.
    pub hostname: Option<String>,
}

/// `[ra]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaConfig {
    /// The interface on which to answer router solicitations (none: off).
    pub interface: Option<String>,
}

/// `[boot]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// The kernel nodes boot (node-init runs under it). Default: Debian's kernel in the
    /// Strata cache (`scripts/setup.sh` unpacks it).
    pub kernel: Option<PathBuf>,
    /// The node-init initramfs (`scripts/build-initramfs.sh` builds it). The server appends
    /// its public key to it before serving.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub cmdline: String,
    /// Role given to nodes nobody assigned.
    pub default_role: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            default_role: "web".into(),
        }
    }
}

/// `[orchestrator]`: timings of the rollout driver and the node-fact flusher (docs/api.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// How often buffered node facts are written to the database, in milliseconds.
    pub flush_ms: u64,
    /// How often the driver steps rollouts and renews its leases, in milliseconds.
    pub tick_ms: u64,
    /// Lease lifetime in milliseconds: how long a dead worker's rollout waits before another
    /// server process takes it over. More than twice `tick_ms`.
    pub lease_ms: u64,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            flush_ms: 500,
            tick_ms: 1000,
            lease_ms: 15_000,
        }
    }
}

/// `[iscsi]`: every known node's chain as LUN 0 of its own target (docs/iscsi.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// Serve iSCSI at all.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Require CHAP: each node proves its own secret (derived from the server key unless
    /// set in `[[iscsi.nodes]]`). Off only on a boot network nothing else can reach.
    pub chap: bool,
    /// Default for every node: writes go to a scratch layer discarded at logout.
    pub stateless: bool,
    /// Default for every node: boot diskless, the chain attached over iSCSI (the boot script
    /// tells node-init with `strata.iscsi`).
    pub diskless: bool,
    /// The portal nodes log in to, `IP:PORT`. Default: `listen` when it names an address,
    /// else the host of the HTTP public URL with `listen`'s port.
    pub portal: Option<std::net::SocketAddrV4>,
    /// Per-node settings.
    pub nodes: Vec<IscsiNodeConfig>,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 3260)),
            chap: true,
            stateless: false,
            diskless: false,
            portal: None,
            nodes: Vec::new(),
        }
    }
}

/// `[[iscsi.nodes]]`: one node's iSCSI settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiNodeConfig {
    /// The node's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its CHAP secret (12 to 255 bytes) instead of the derived one.
    pub chap_secret: Option<String>,
    /// A secret the target proves back (mutual CHAP).
    pub target_secret: Option<String>,
    /// Overrides `iscsi.stateless` for this node.
    pub stateless: Option<bool>,
    /// Overrides `iscsi.diskless` for this node.
    pub diskless: Option<bool>,
    /// Boot with iPXE's `sanboot` from the node's LUN (an image that carries its own
    /// bootloader) instead of node-init.
    #[serde(default)]
    pub sanboot: bool,
}

impl Config {
    /// Reads a TOML file. Unknown keys are errors naming the key and line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let o = &self.orchestrator;
        if o.flush_ms < 10
            || o.tick_ms < 10
            || o.lease_ms <= 2 * o.tick_ms
            || o.lease_ms > 3_600_000
        {
            return Err(ConfigError::Invalid(format!(
                "orchestrator: flush_ms ({}) and tick_ms ({}) must be at least 10, lease_ms ({}) more than twice tick_ms and at most an hour",
                o.flush_ms, o.tick_ms, o.lease_ms
            )));
        }
        let d = &self.dhcp;
        if d.mode != DhcpMode::Off {
            if d.interface.is_none() {
                return Err(ConfigError::Invalid(
                    "dhcp.interface is required when dhcp.mode is not \"off\"".into(),
                ));
            }
            if d.server_ip.is_none() {
                return Err(ConfigError::Invalid(
                    "dhcp.server_ip is required when dhcp.mode is not \"off\"".into(),
                ));
            }
        }
        if d.mode == DhcpMode::Full {
            match (d.pool_start, d.pool_end) {
                (Some(a), Some(b)) if u32::from(a) <= u32::from(b) => {}
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(
                        "dhcp.pool_start is after dhcp.pool_end".into(),
                    ))
                }
                _ => {
                    return Err(ConfigError::Invalid(
                        "dhcp.pool_start and dhcp.pool_end are required in full mode".into(),
                    ))
                }
            }
        }
        self.multicast.validate().map_err(ConfigError::Invalid)?;
        for n in &self.iscsi.nodes {
            if n.mac.parse::<wire::dhcp::MacAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "iscsi.nodes: bad MAC {:?}",
                    n.mac
                )));
            }
            for (key, s) in [
                ("chap_secret", &n.chap_secret),
                ("target_secret", &n.target_secret),
            ] {
                if s.as_ref().is_some_and(|s| !(12..=255).contains(&s.len())) {
                    return Err(ConfigError::Invalid(format!(
                        "iscsi.nodes {}: {key} must be 12 to 255 bytes",
                        n.mac
                    )));
                }
            }
        }
        if let Some(url) = &self.http.public_url {
            if !url.starts_with("http://") {
                return Err(ConfigError::Invalid(format!(
                    "http.public_url {url:?} must start with http://"
                )));
            }
        }
        Ok(())
    }

    /// The URL nodes use to reach the HTTP service, without a trailing slash.
    pub fn public_url(&self) -> String {
        if let Some(url) = &self.http.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        let port = self.http.listen.port();
        let host = match (self.dhcp.server_ip, self.http.listen.ip()) {
            (Some(ip), _) => ip.to_string(),
            (None, ip) if !ip.is_unspecified() => ip.to_string(),
            _ => "127.0.0.1".to_owned(),
        };
        format!("http://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c.dhcp.mode, DhcpMode::Off);
        assert_eq!(c.http.listen.port(), 8080);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(
            "[http]\nlisten = \"0.0.0.0:80\"\nbogus = 1\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn full_dhcp_needs_a_pool() {
        let err = Config::parse(
            "[dhcp]\nmode = \"full\"\ninterface = \"br0\"\nserver_ip = \"10.0.0.1\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid(ref m) if m.contains("pool")),
            "{err}"
        );
    }

    #[test]
    fn public_url_follows_server_ip() {
        let c = Config::parse(
            "[dhcp]\nmode = \"proxy\"\ninterface = \"br0\"\nserver_ip = \"10.42.0.1\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.public_url(), "http://10.42.0.1:8080");
    }
}
