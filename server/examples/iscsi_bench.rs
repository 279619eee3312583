//! A small fio-like iSCSI load generator for `scripts/bench-iscsi.sh`: logs in to a target
//! (any RFC 7143 target: ours or tgt), then keeps `--qd` commands in flight for `--seconds`,
//! sequential or random, reads or writes of `--bs` bytes (writes as immediate data), and
//! prints one line: `MODE bs=.. qd=.. iops=.. mbps=..`. Debian's fio has no libiscsi
//! engine, and libiscsi's iscsi-perf only reads, hence this tool.
//!
//!   iscsi_bench --addr 127.0.0.1:3260 --target iqn.x --lun 0 --mode randwrite

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use strata_server::iscsi::pdu::{self, Bhs, Digests, LoginRequest, Lun, Pdu, ScsiCommand, Stage};

struct Args {
    addr: String,
    target: String,
    lun: u16,
    mode: String,
    bs: u32,
    qd: u32,
    seconds: u64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        addr: String::new(),
        target: String::new(),
        lun: 0,
        mode: "randread".into(),
        bs: 4096,
        qd: 32,
        seconds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--addr" => a.addr = v,
            "--target" => a.target = v,
            "--lun" => a.lun = v.parse()?,
            "--mode" => a.mode = v,
            "--bs" => a.bs = v.parse()?,
            "--qd" => a.qd = v.parse()?,
            "--seconds" => a.seconds = v.parse()?,
            _ => bail!("unknown option {k}"),
        }
    }
    if a.addr.is_empty() || a.target.is_empty() {
        bail!("usage: iscsi_bench --addr HOST:PORT --target IQN [--lun N] [--mode seqread|randread|seqwrite|randwrite] [--bs BYTES] [--qd N] [--seconds S]");
    }
    Ok(a)
}

struct Conn {
    rd: BufReader<TcpStream>,
    wr: BufWriter<TcpStream>,
    cmd_sn: u32,
    max_cmd_sn: u32,
    itt: u32,
    lun: Lun,
}

impl Conn {
    fn send(&mut self, p: &Pdu) -> Result<()> {
        p.write_to_writer(&mut self.wr)
    }

    fn recv(&mut self) -> Result<Pdu> {
        let mut raw = [0u8; pdu::BHS_LEN];
        self.rd.read_exact(&mut raw)?;
        let f = pdu::Framing::of(&raw, 1 << 24)?;
        let mut rest = vec![0u8; f.rest_len(Digests::default())];
        self.rd.read_exact(&mut rest)?;
        Ok(Pdu::decode(&raw, f, &rest, Digests::default())?)
    }

    fn command(&mut self, cdb: [u8; 16], edtl: u32, write: Option<&[u8]>) -> Result<u32> {
        self.itt = self.itt.wrapping_add(1);
        let c = ScsiCommand {
            immediate: false,
            final_: true,
            read: write.is_none() && edtl > 0,
            write: write.is_some(),
            attr: 1,
            lun: self.lun,
            itt: self.itt,
            expected_len: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&Pdu::new(
            Bhs::ScsiCommand(c),
            write.map(<[u8]>::to_vec).unwrap_or_default(),
        ))?;
        Ok(self.itt)
    }

    /// Reads PDUs until one command completes; returns its status and any Data-In.
    fn complete(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            match p.bhs {
                Bhs::DataIn(d) => {
                    data.extend_from_slice(&p.data);
                    if d.has_status {
                        self.max_cmd_sn = d.max_cmd_sn;
                        return Ok((d.status, data));
                    }
                }
                Bhs::ScsiResponse(r) => {
                    self.max_cmd_sn = r.max_cmd_sn;
                    return Ok((r.status, data));
                }
                Bhs::NopIn(_) => {}
                other => bail!("unexpected PDU {other:?}"),
            }
        }
    }
}

trait WritePdu {
    fn write_to_writer(&self, w: &mut impl Write) -> Result<()>;
}

impl WritePdu for Pdu {
    fn write_to_writer(&self, w: &mut impl Write) -> Result<()> {
        w.write_all(&self.to_bytes(Digests::default()))?;
        Ok(())
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let s = TcpStream::connect(&a.addr).with_context(|| format!("connecting to {}", a.addr))?;
    s.set_nodelay(true)?;
    let mut c = Conn {
        rd: BufReader::with_capacity(1 << 20, s.try_clone()?),
        wr: BufWriter::with_capacity(1 << 20, s),
        cmd_sn: 1,
        max_cmd_sn: 1,
        itt: 0,
        lun: Lun::from_number(a.lun),
    };
    let login = LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::Operational,
        nsg: Stage::FullFeature,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0x23, 0, 1],
        tsih: 0,
        itt: 0,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
    };
    let text = format!(
        "InitiatorName=iqn.2026-11.io.strata:bench\0TargetName={}\0SessionType=Normal\0HeaderDigest=None\0DataDigest=None\0\
         ImmediateData=Yes\0InitialR2T=No\0MaxRecvDataSegmentLength=262144\0FirstBurstLength=262144\0MaxBurstLength=1048576\0",
        a.target
    );
    c.send(&Pdu::new(Bhs::LoginRequest(login), text.into_bytes()))?;
    c.wr.flush()?;
    match c.recv()?.bhs {
        Bhs::LoginResponse(r) if r.status_class == 0 && r.transit => c.max_cmd_sn = r.max_cmd_sn,
        other => bail!("login failed: {other:?}"),
    }
    // READ CAPACITY (16) for the size; a first CHECK CONDITION is the target's UNIT
    // ATTENTION (power on / reset), as tgt reports it: ask again.
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let mut cap = Vec::new();
    for attempt in 0..3 {
        c.command(cdb, 32, None)?;
        c.wr.flush()?;
        let (st, data) = c.complete()?;
        if st == 0 && data.len() >= 12 {
            cap = data;
            break;
        }
        if attempt == 2 {
            bail!("READ CAPACITY failed (status {st})");
        }
    }
    let last = u64::from_be_bytes(cap[0..8].try_into()?);
    let lbs = u32::from_be_bytes(cap[8..12].try_into()?);
    let per = u64::from((a.bs / lbs).max(1));
    let slots = (last + 1) / per;
    let write = a.mode.ends_with("write");
    let random = a.mode.starts_with("rand");
    let payload = vec![0x5au8; a.bs as usize];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seq = 0u64;
    let mut next_lba = move || {
        let slot = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        } else {
            seq = (seq + 1) % slots;
            seq
        };
        slot * per
    };
    let mut issue = |c: &mut Conn| -> Result<()> {
        let lba = next_lba();
        let mut cdb = [0u8; 16];
        cdb[0] = if write { 0x8a } else { 0x88 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&((a.bs / lbs).max(1)).to_be_bytes());
        c.command(cdb, a.bs, write.then_some(payload.as_slice()))?;
        Ok(())
    };
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let mut inflight = 0u32;
    let mut done = 0u64;
    let start = Instant::now();
    loop {
        let now = Instant::now();
        while now < deadline && inflight < a.qd && c.cmd_sn.wrapping_sub(c.max_cmd_sn) as i32 <= 0 {
            issue(&mut c)?;
            inflight += 1;
        }
        c.wr.flush()?;
        if inflight == 0 {
            break;
        }
        let (st, _) = c.complete()?;
        if st != 0 {
            bail!("command failed with status {st:#x}");
        }
        inflight -= 1;
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = done as f64 / secs;
    println!(
        "{} bs={} qd={} iops={:.0} mbps={:.1}",
        a.mode,
        a.bs,
        a.qd,
        iops,
        iops * f64::from(a.bs) / 1e6
    );
    Ok(())
}
