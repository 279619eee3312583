//! The iSCSI target against real initiators: libiscsi's tools (iscsi-ls, iscsi-inq,
//! iscsi-readcapacity16) and QEMU's libiscsi driver (qemu-img, qemu-io), on LUNs backed by
//! a base → role → node VHDX chain. Also: CHAP, a node limited to its own target, layers
//! below the node's never changing, stateless LUNs, and hostile input on a raw socket
//! (malformed PDUs, wrong lengths, out-of-range LBAs, a connection dropped mid-write).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use strata_server::iscsi::pdu::{
    self, Bhs, DataOut, Digests, LoginRequest, Lun, Pdu, ScsiCommand, Stage,
};
use strata_server::iscsi::{
    node_target_iqn, Backing, ChapCredentials, IscsiTarget, StaticLuns, TargetAccess,
    TargetOptions, VhdxLun,
};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// Runs a peer tool; a missing tool fails the test with an install hint.
fn tool(cmd: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(cmd).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let pkg = if cmd.starts_with("qemu") {
                "qemu-utils qemu-block-extra"
            } else {
                "libiscsi-bin"
            };
            anyhow::anyhow!("{cmd} not found: apt-get install {pkg} (scripts/setup.sh)")
        } else {
            anyhow::anyhow!("running {cmd}: {e}")
        }
    })?;
    Ok(out)
}

fn tool_ok(cmd: &str, args: &[&str]) -> Result<String> {
    let out = tool(cmd, args)?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A base, a role on it, and two node layers on the role.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    role: PathBuf,
    nodes: [PathBuf; 2],
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, pattern(1, SIZE as usize))?;
        let opts = vhdx::CreateOptions {
            block_size: MIB as u32,
            ..Default::default()
        };
        let base = dir.path().join("base.vhdx");
        vhdx::from_raw(&raw, &base, None, &opts)?;
        let role = dir.path().join("role.vhdx");
        vhdx::create_differencing(
            &role,
            &vhdx::Chain::from_paths(std::slice::from_ref(&base))?,
            &opts,
        )?;
        {
            let mut c = vhdx::Chain::from_paths_writable(&[base.clone(), role.clone()])?;
            c.write_at(&pattern(2, MIB as usize), 2 * MIB)?;
            c.flush()?;
        }
        let below = vhdx::Chain::from_paths(&[base.clone(), role.clone()])?;
        let nodes = [dir.path().join("node1.vhdx"), dir.path().join("node2.vhdx")];
        for n in &nodes {
            vhdx::create_differencing(n, &below, &opts)?;
        }
        Ok(Fixture {
            dir,
            base,
            role,
            nodes,
        })
    }

    fn chain(&self, node: usize) -> Vec<PathBuf> {
        vec![
            self.base.clone(),
            self.role.clone(),
            self.nodes[node].clone(),
        ]
    }

    fn expected(&self) -> Result<Vec<u8>> {
        let c = vhdx::Chain::from_paths(&[self.base.clone(), self.role.clone()])?;
        let mut v = vec![0u8; SIZE as usize];
        c.read_at(&mut v, 0)?;
        Ok(v)
    }
}

fn b3(p: &Path) -> Result<blake3::Hash> {
    Ok(blake3::hash(&std::fs::read(p)?))
}

/// The target running on its own runtime thread; cancelled on drop.
struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(luns: StaticLuns) -> Result<Running> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let target = IscsiTarget::new(listener, Arc::new(luns), TargetOptions::default());
        let thread = std::thread::spawn(move || {
            if let Err(e) = rt.block_on(target.run(token)) {
                eprintln!("target: {e}");
            }
        });
        Ok(Running {
            addr,
            cancel,
            thread: Some(thread),
        })
    }

    fn url(&self, iqn: &str) -> String {
        format!("iscsi://{}/{iqn}/0", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn node_luns(f: &Fixture, chap: bool) -> Result<StaticLuns> {
    let mut luns = StaticLuns::new();
    for i in 0..2 {
        let access = TargetAccess {
            chap: chap.then(|| ChapCredentials {
                user: format!("node{i}"),
                secret: format!("secret-of-node-{i}").into_bytes(),
            }),
            target_chap: None,
            initiators: vec![],
        };
        let lun = VhdxLun::open_node(&f.chain(i))?;
        luns.insert(
            node_target_iqn(&format!("node{i}")),
            access,
            Backing::Shared(Arc::new(lun)),
        );
    }
    Ok(luns)
}

#[test]
fn libiscsi_and_qemu_read_and_write_a_node_chain() -> Result<()> {
    let f = Fixture::new()?;
    let (base_hash, role_hash) = (b3(&f.base)?, b3(&f.role)?);
    let t = Running::start(node_luns(&f, false)?)?;
    let (n0, n1) = (node_target_iqn("node0"), node_target_iqn("node1"));

    let ls = tool_ok("iscsi-ls", &["-s", &format!("iscsi://{}", t.addr)])?;
    assert!(ls.contains(&n0) && ls.contains(&n1), "{ls}");
    let inq = tool_ok("iscsi-inq", &[&t.url(&n0)])?;
    assert!(inq.contains("Vendor:STRATA"), "{inq}");
    let cap = tool_ok("iscsi-readcapacity16", &[&t.url(&n0)])?;
    assert!(cap.contains(&format!("Total size:{SIZE}")), "{cap}");
    for page in ["0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"] {
        tool_ok("iscsi-inq", &["-e", "1", "-c", page, &t.url(&n0)])
            .with_context(|| format!("VPD page {page}"))?;
    }

    // qemu-img reads the whole chain through the target.
    let out = f.dir.path().join("read.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &t.url(&n0),
            out.to_str().context("path")?,
        ],
    )?;
    assert!(
        std::fs::read(&out)? == f.expected()?,
        "qemu-img read differs from the chain"
    );

    // qemu-io writes through node 0's target, and reads its data back.
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 1M 640k",
            "-c",
            "flush",
            &t.url(&n0),
        ],
    )?;
    let r = tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xa5 1M 640k", &t.url(&n0)],
    )?;
    assert!(!r.contains("Pattern verification failed"), "{r}");
    // Node 1 still sees the role's data there.
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &t.url(&n1),
            out.to_str().context("path")?,
        ],
    )?;
    assert!(
        std::fs::read(&out)? == f.expected()?,
        "node 1 sees node 0's writes"
    );
    drop(t);

    assert_eq!(b3(&f.base)?, base_hash, "base layer changed");
    assert_eq!(b3(&f.role)?, role_hash, "role layer changed");
    // The writes are in node 0's own layer, durably.
    let c = vhdx::Chain::from_paths(&f.chain(0))?;
    let mut got = vec![0u8; 640 * 1024];
    c.read_at(&mut got, MIB)?;
    assert!(got.iter().all(|&b| b == 0xa5));
    Ok(())
}

#[test]
fn chap_per_node_and_own_target_only() -> Result<()> {
    let f = Fixture::new()?;
    let t = Running::start(node_luns(&f, true)?)?;
    let n0 = node_target_iqn("node0");
    let with = |user: &str, secret: &str| format!("iscsi://{user}%{secret}@{}/{n0}/0", t.addr);
    tool_ok("iscsi-inq", &[&with("node0", "secret-of-node-0")])?;
    let wrong = tool("iscsi-inq", &[&with("node0", "not-the-secret")])?;
    assert!(!wrong.status.success(), "wrong CHAP secret logged in");
    // Node 1's (valid) credentials do not open node 0's target.
    let other = tool("iscsi-inq", &[&with("node1", "secret-of-node-1")])?;
    assert!(
        !other.status.success(),
        "node 1 logged in to node 0's target"
    );
    let none = tool("iscsi-inq", &[&t.url(&n0)])?;
    assert!(!none.status.success(), "logged in without CHAP");
    // The target is still serving after the failures.
    tool_ok("iscsi-inq", &[&with("node0", "secret-of-node-0")])?;
    Ok(())
}

#[test]
fn stateless_lun_discards_writes_at_logout() -> Result<()> {
    let f = Fixture::new()?;
    let node_hash = b3(&f.nodes[0])?;
    let scratch = f.dir.path().join("scratch");
    std::fs::create_dir(&scratch)?;
    let mut luns = StaticLuns::new();
    let iqn = node_target_iqn("diskless");
    luns.insert(
        iqn.clone(),
        TargetAccess::default(),
        Backing::Stateless {
            paths: f.chain(0),
            scratch_dir: scratch.clone(),
        },
    );
    let t = Running::start(luns)?;
    let r = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 0 64k",
            "-c",
            "read -P 0x3c 0 64k",
            &t.url(&iqn),
        ],
    )?;
    assert!(!r.contains("Pattern verification failed"), "{r}");
    let out = f.dir.path().join("again.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &t.url(&iqn),
            out.to_str().context("path")?,
        ],
    )?;
    assert!(
        std::fs::read(&out)? == f.expected()?,
        "a stateless write survived logout"
    );
    drop(t);
    assert_eq!(
        b3(&f.nodes[0])?,
        node_hash,
        "the node layer under a stateless LUN changed"
    );
    assert_eq!(
        std::fs::read_dir(&scratch)?.count(),
        0,
        "scratch layers left behind"
    );
    Ok(())
}

/// A minimal initiator on a raw socket, to send what real initiators never would.
struct Raw {
    s: TcpStream,
    itt: u32,
    cmd_sn: u32,
}

impl Raw {
    fn login(addr: SocketAddr, target: &str, extra: &str) -> Result<Raw> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        let mut r = Raw {
            s,
            itt: 1,
            cmd_sn: 1,
        };
        let req = LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let text = format!("InitiatorName=iqn.test:raw\0TargetName={target}\0{extra}");
        r.send(&Pdu::new(Bhs::LoginRequest(req), text.into_bytes()))?;
        let resp = r.recv()?;
        match resp.bhs {
            Bhs::LoginResponse(l) if l.status_class == 0 && l.transit => Ok(r),
            other => bail!("login failed: {other:?}"),
        }
    }

    fn send(&mut self, p: &Pdu) -> Result<()> {
        self.s.write_all(&p.to_bytes(Digests::default()))?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Pdu> {
        let mut raw = [0u8; pdu::BHS_LEN];
        self.s.read_exact(&mut raw)?;
        let f = pdu::Framing::of(&raw, 1 << 24)?;
        let mut rest = vec![0u8; f.rest_len(Digests::default())];
        self.s.read_exact(&mut rest)?;
        Ok(Pdu::decode(&raw, f, &rest, Digests::default())?)
    }

    fn command(&mut self, cdb: &[u8], edtl: u32, write: bool, data: Vec<u8>) -> Result<u32> {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        self.itt += 1;
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: !write && edtl > 0,
            write,
            attr: 1,
            lun: Lun::default(),
            itt: self.itt,
            expected_len: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb: c,
        };
        self.cmd_sn += 1;
        self.send(&Pdu::new(Bhs::ScsiCommand(cmd), data))?;
        Ok(self.itt)
    }

    /// Reads until the command's status; returns (status, sense key, asc, data).
    fn status(&mut self) -> Result<(u8, u8, u8, Vec<u8>)> {
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            match p.bhs {
                Bhs::DataIn(d) => {
                    data.extend_from_slice(&p.data);
                    if d.has_status {
                        return Ok((d.status, 0, 0, data));
                    }
                }
                Bhs::ScsiResponse(r) => {
                    let (key, asc) = match p.data.as_slice() {
                        [_, _, s @ ..] if s.len() >= 14 => (s[2] & 0x0f, s[12]),
                        _ => (0, 0),
                    };
                    return Ok((r.status, key, asc, data));
                }
                other => bail!("unexpected {other:?}"),
            }
        }
    }
}

fn read10(lba: u32, n: u16) -> Vec<u8> {
    let l = lba.to_be_bytes();
    let c = n.to_be_bytes();
    vec![0x28, 0, l[0], l[1], l[2], l[3], 0, c[0], c[1], 0]
}

#[test]
fn hostile_input_gets_errors_not_damage() -> Result<()> {
    let f = Fixture::new()?;
    let (base_hash, role_hash) = (b3(&f.base)?, b3(&f.role)?);
    let t = Running::start(node_luns(&f, false)?)?;
    let n0 = node_target_iqn("node0");
    let blocks = (SIZE / 512) as u32;

    // Out-of-range LBAs: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE.
    let mut r = Raw::login(t.addr, &n0, "")?;
    r.command(&read10(blocks, 1), 512, false, vec![])?;
    let (st, key, asc, _) = r.status()?;
    assert_eq!((st, key, asc), (2, 5, 0x21));
    r.command(&read10(blocks - 1, 2), 1024, false, vec![])?;
    let (st, key, asc, _) = r.status()?;
    assert_eq!((st, key, asc), (2, 5, 0x21));
    let mut w16 = vec![
        0x8a, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0,
    ];
    r.command(&w16, 512, true, vec![0xff; 512])?;
    let (st, key, asc, _) = r.status()?;
    assert_eq!((st, key, asc), (2, 5, 0x21));
    // An unknown opcode: INVALID COMMAND OPERATION CODE.
    r.command(&[0xc7, 0, 0, 0, 0, 0], 0, false, vec![])?;
    let (st, key, asc, _) = r.status()?;
    assert_eq!((st, key, asc), (2, 5, 0x20));
    // A write whose Expected Data Transfer Length is short of what the CDB asks: only
    // the whole blocks sent are written (GOOD with an overflow residual).
    w16 = vec![0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0];
    r.command(&w16, 512, true, vec![0xff; 512])?;
    let (st, _, _, _) = r.status()?;
    assert_eq!(st, 0);
    r.command(&read10(0, 2), 1024, false, vec![])?;
    let (_, _, _, data) = r.status()?;
    assert!(data[..512].iter().all(|&b| b == 0xff) && data[512..] != [0xff; 512][..]);
    // The connection still works.
    r.command(&read10(0, 1), 512, false, vec![])?;
    let (st, _, _, data) = r.status()?;
    assert_eq!((st, data.len()), (0, 512));

    // A data segment longer than we accept: Reject, then the connection closes.
    let mut p = Pdu::new(
        Bhs::NopOut(pdu::NopOut {
            immediate: true,
            lun: Lun::default(),
            itt: 99,
            ttt: !0,
            cmd_sn: r.cmd_sn,
            exp_stat_sn: 0,
        }),
        vec![0u8; 300_000],
    )
    .to_bytes(Digests::default());
    p.truncate(pdu::BHS_LEN);
    r.s.write_all(&p)?;
    let rej = r.recv()?;
    assert!(
        matches!(
            rej.bhs,
            Bhs::Reject(pdu::Reject {
                reason: pdu::reject_reason::PROTOCOL_ERROR,
                ..
            })
        ),
        "{rej:?}"
    );
    assert!(
        r.recv().is_err(),
        "connection stayed open after a bad length"
    );

    // Garbage instead of a login: the connection closes, the target lives on.
    let mut g = TcpStream::connect(t.addr)?;
    g.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    g.write_all(&[0xffu8; 48])?;
    let mut buf = [0u8; 64];
    assert!(matches!(g.read(&mut buf), Ok(0) | Err(_)));
    // A login with a broken text segment is refused with a status, not a crash.
    let mut g = TcpStream::connect(t.addr)?;
    g.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    let req = LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::Operational,
        nsg: Stage::FullFeature,
        version_max: 0,
        version_min: 0,
        isid: [0; 6],
        tsih: 0,
        itt: 0,
        cid: 0,
        cmd_sn: 0,
        exp_stat_sn: 0,
    };
    g.write_all(
        &Pdu::new(Bhs::LoginRequest(req), b"InitiatorName\0\xff=\0".to_vec())
            .to_bytes(Digests::default()),
    )?;
    let mut raw = [0u8; 48];
    g.read_exact(&mut raw)?;
    let Bhs::LoginResponse(l) = Bhs::parse(&raw)? else {
        bail!("not a login response")
    };
    assert_eq!(l.status_class, 2);

    // A connection dropped in the middle of a write leaves the LUN as it was.
    let before = {
        let mut c = Raw::login(t.addr, &n0, "")?;
        c.command(&read10(0, 128), 65536, false, vec![])?;
        c.status()?.3
    };
    let mut d = Raw::login(
        t.addr,
        &n0,
        "InitialR2T=No\0ImmediateData=Yes\0FirstBurstLength=65536\0",
    )?;
    let itt = d.command(
        &[0x2a, 0, 0, 0, 0, 0, 0, 0, 128, 0],
        65536,
        true,
        vec![0xee; 8192],
    )?;
    let dout = DataOut {
        final_: false,
        lun: Lun::default(),
        itt,
        ttt: !0,
        exp_stat_sn: 0,
        data_sn: 0,
        buffer_offset: 8192,
    };
    d.send(&Pdu::new(Bhs::DataOut(dout), vec![0xee; 8192]))?;
    drop(d);
    let mut c = Raw::login(t.addr, &n0, "")?;
    c.command(&read10(0, 128), 65536, false, vec![])?;
    assert!(c.status()?.3 == before, "a dropped write changed the LUN");
    // Immediate data beyond FirstBurstLength is a protocol error, not a write.
    let mut e = Raw::login(t.addr, &n0, "FirstBurstLength=4096\0")?;
    e.command(
        &[0x2a, 0, 0, 0, 0, 0, 0, 0, 16, 0],
        8192,
        true,
        vec![0xee; 8192],
    )?;
    assert!(matches!(e.recv()?.bhs, Bhs::Reject(_)));
    c.command(&read10(0, 128), 65536, false, vec![])?;
    assert!(c.status()?.3 == before, "a refused write changed the LUN");

    drop(t);
    assert_eq!(b3(&f.base)?, base_hash);
    assert_eq!(b3(&f.role)?, role_hash);
    Ok(())
}

/// A boot sector that prints a marker on COM1 and halts (x86 real mode, loaded at 0x7c00).
fn boot_sector(marker: &[u8]) -> Vec<u8> {
    let mut s = vec![
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xbe, 0x16, 0x7c, // mov si, 0x7c16 (the message)
        0xac, // lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp lodsb
        0xfa, // done: cli
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ];
    s.extend_from_slice(marker);
    s.extend_from_slice(b"\r\n\0");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xaa]);
    s
}

#[test]
fn qemu_boots_a_vm_from_the_lun() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("boot.raw");
    let marker = b"STRATA-ISCSI-BOOT-OK";
    let mut img = boot_sector(marker);
    img.resize(4 * MIB as usize, 0);
    std::fs::write(&raw, &img)?;
    let opts = vhdx::CreateOptions {
        block_size: MIB as u32,
        ..Default::default()
    };
    let base = dir.path().join("base.vhdx");
    vhdx::from_raw(&raw, &base, None, &opts)?;
    let node = dir.path().join("node.vhdx");
    vhdx::create_differencing(
        &node,
        &vhdx::Chain::from_paths(std::slice::from_ref(&base))?,
        &opts,
    )?;
    let mut luns = StaticLuns::new();
    let iqn = node_target_iqn("vm");
    luns.insert(
        iqn.clone(),
        TargetAccess::default(),
        Backing::Shared(Arc::new(VhdxLun::open_node(&[base, node])?)),
    );
    let t = Running::start(luns)?;
    let serial = dir.path().join("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", t.url(&iqn)))
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("qemu-system-x86_64: {e} (apt-get install qemu-system-x86)")
        })?;
    // Wait for the marker; give up (and fail) only if QEMU exits or after 120 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let found = loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        if log.windows(marker.len()).any(|w| w == marker) {
            break true;
        }
        if qemu.try_wait()?.is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        found,
        "the VM did not boot from the iSCSI LUN: {}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    Ok(())
}
