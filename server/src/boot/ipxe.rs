//! iPXE scripts. A client that DHCP pointed at `/boot/ipxe` gets a two-line script that
//! chains to its own per-node script, `/boot/node.ipxe?mac=<its MAC>`, which names the kernel,
//! the initramfs and a kernel command line telling node-init where the server is and which
//! address iPXE already obtained (so node-init needs no second DHCP exchange).
//!
//! The kernel is the one recorded with the version the node boots (`/boot/kernels/<blake3>`,
//! with `/boot/initramfs/<blake3>` carrying node-init's modules for it), or the configured
//! `/boot/kernel` and `/boot/initramfs` when that version records none (docs/node-init.md).

use std::fmt::Write;

/// The first-stage script: iPXE expands `${netX/mac}` (the NIC it booted from).
pub fn chain_script(public_url: &str) -> String {
    format!("#!ipxe\nchain {public_url}/boot/node.ipxe?mac=${{netX/mac}}\n")
}

/// What a per-node script needs.
#[derive(Debug, Clone)]
pub struct NodeBoot<'a> {
    /// The server's URL as nodes reach it.
    pub public_url: &'a str,
    /// The node's MAC (normalised).
    pub mac: &'a str,
    /// A label for the console.
    pub node: &'a str,
    /// The role it boots.
    pub role: &'a str,
    /// Extra kernel arguments from the configuration.
    pub extra_cmdline: &'a str,
    /// Extra kernel arguments for this node (a diskless node's `strata.iscsi`), if any.
    pub node_cmdline: Option<&'a str>,
    /// The kernel and initramfs to boot: the image's own, or `None` for the configured ones.
    pub files: Option<&'a ImageBootFiles>,
}

/// The kernel recorded with a node's image version, and the initramfs composed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBootFiles {
    /// Image and version, for the console line.
    pub image: String,
    /// Version.
    pub version: u64,
    /// Kernel release.
    pub release: String,
    /// blake3 of the kernel blob (`/boot/kernels/<id>`).
    pub kernel: wire::chunk::Digest,
    /// blake3 of the composed initramfs (`/boot/initramfs/<id>`).
    pub initramfs: wire::chunk::Digest,
}

/// The per-node script. The initrd is named `initramfs` and the command line says
/// `initrd=initramfs`, which the EFI stub needs under UEFI iPXE and BIOS kernels ignore.
pub fn node_script(b: &NodeBoot<'_>) -> String {
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(
        s,
        "echo Strata: node {} role {} ({})",
        b.node, b.role, b.mac
    );
    let (kernel, initramfs) = match b.files {
        Some(f) => {
            let _ = writeln!(
                s,
                "echo Strata: {} version {} kernel {}",
                f.image, f.version, f.release
            );
            (
                format!("/boot/kernels/{}", f.kernel),
                format!("/boot/initramfs/{}", f.initramfs),
            )
        }
        None => ("/boot/kernel".to_owned(), "/boot/initramfs".to_owned()),
    };
    let _ = writeln!(s, "initrd --name initramfs {}{initramfs}", b.public_url);
    let _ = write!(
        s,
        "kernel {}{kernel} initrd=initramfs console=ttyS0 panic=10 strata.server={} \
         strata.mac=${{netX/mac}} strata.ip=${{netX/ip}} strata.netmask=${{netX/netmask}} \
         strata.gw=${{netX/gateway}}",
        b.public_url, b.public_url
    );
    for extra in [b.extra_cmdline, b.node_cmdline.unwrap_or_default()] {
        if !extra.trim().is_empty() {
            s.push(' ');
            s.push_str(extra.trim());
        }
    }
    s.push('\n');
    s.push_str("boot\n");
    s
}

/// A MAC address in the canonical form `aa:bb:cc:dd:ee:ff` (from `:` or `-` separated hex, any
/// case), or `None`.
pub fn normalize_mac(text: &str) -> Option<String> {
    text.trim()
        .parse::<wire::dhcp::MacAddr>()
        .ok()
        .map(|m| m.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise() {
        assert_eq!(
            normalize_mac("52-54-00-AB-cd-01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:0g"), None);
        assert_eq!(normalize_mac("525:4:00:ab:cd:01"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:+1"), None);
    }

    #[test]
    fn node_script_boots_kernel_and_initramfs() {
        let s = node_script(&NodeBoot {
            public_url: "http://10.0.0.1:8080",
            mac: "52:54:00:00:00:01",
            node: "n1",
            role: "web",
            extra_cmdline: " quiet ",
            node_cmdline: None,
            files: None,
        });
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("initrd --name initramfs http://10.0.0.1:8080/boot/initramfs\n"));
        assert!(
            s.contains("kernel http://10.0.0.1:8080/boot/kernel initrd=initramfs console=ttyS0")
        );
        assert!(s.contains("strata.server=http://10.0.0.1:8080 "));
        assert!(s.contains(" quiet\nboot\n"));
    }

    #[test]
    fn node_script_boots_the_images_own_kernel() {
        let files = ImageBootFiles {
            image: "cloudbox".into(),
            version: 3,
            release: "6.1.0-56-cloud-amd64".into(),
            kernel: blake3::hash(b"k").into(),
            initramfs: blake3::hash(b"i").into(),
        };
        let s = node_script(&NodeBoot {
            public_url: "http://10.0.0.1:8080",
            mac: "52:54:00:00:00:01",
            node: "n1",
            role: "web",
            extra_cmdline: "",
            node_cmdline: None,
            files: Some(&files),
        });
        assert!(s.contains("echo Strata: cloudbox version 3 kernel 6.1.0-56-cloud-amd64\n"));
        assert!(s.contains(&format!(
            "initrd --name initramfs http://10.0.0.1:8080/boot/initramfs/{}\n",
            files.initramfs
        )));
        assert!(s.contains(&format!(
            "kernel http://10.0.0.1:8080/boot/kernels/{} initrd=initramfs ",
            files.kernel
        )));
    }
}
