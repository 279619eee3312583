//! The login phase (RFC 7143 §6.3, §11.12-13): security negotiation with CHAP (§12.1.3,
//! RFC 1994 with MD5), then operational parameter negotiation (§13), then the move to
//! the full-feature phase. Sans-IO: [`Login::on_request`] takes one Login Request PDU and
//! returns the response and what happened.

use std::sync::Arc;

use md5::{Digest, Md5};

use super::lun::{ChapCredentials, LunProvider, TargetAccess};
use super::pdu::{Bhs, LoginRequest, LoginResponse, Pdu, Stage};
use super::text::{parse_binary, parse_number, TextPairs};

/// Our MaxRecvDataSegmentLength: the largest data segment we accept in full feature phase.
pub const TARGET_MAX_RECV: u32 = 262_144;
/// The largest data segment accepted during login (RFC 7143 §6.1: 8192 until negotiated).
pub const LOGIN_MAX_RECV: u32 = 8192;
/// Our MaxBurstLength offer.
pub const TARGET_MAX_BURST: u32 = 1_048_576;
/// Our FirstBurstLength offer.
pub const TARGET_FIRST_BURST: u32 = 262_144;

/// Session type (RFC 7143 §13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// SCSI commands to one target.
    Normal,
}

/// Negotiated values of a session and connection (RFC 7143 §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: our Data-In segments are at most this.
    pub initiator_max_recv: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
}

impl Default for Params {
    /// RFC 7143 defaults.
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            initiator_max_recv: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// What a completed login established.
#[derive(Debug, Clone)]
pub struct Established {
    /// Discovery or Normal.
    pub session_type: SessionType,
    /// InitiatorName.
    pub initiator: String,
    /// TargetName (Normal sessions).
    pub target: Option<String>,
    /// Negotiated values.
    pub params: Params,
    /// ISID from the initiator.
    pub isid: [u8; 6],
    /// The TSIH we assigned.
    pub tsih: u16,
    /// CmdSN expected next.
    pub exp_cmd_sn: u32,
    /// StatSN to use next.
    pub stat_sn: u32,
}

/// The result of one login step.
#[derive(Debug)]
pub enum Step {
    /// Send the response and wait for the next request.
    Continue(Pdu),
    /// Send the response; the login failed; close the connection.
    Fail(Pdu),
    /// Send the response; the full feature phase starts.
    Done(Pdu, Box<Established>),
}

/// Login status class and detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u8, pub u8);

impl Status {
    /// Success.
    pub const OK: Status = Status(0, 0);
    /// Initiator error (miscellaneous).
    pub const INITIATOR_ERROR: Status = Status(2, 0);
    /// Authentication failure.
    pub const AUTH_FAILED: Status = Status(2, 1);
    /// Authorization failure.
    pub const FORBIDDEN: Status = Status(2, 2);
    /// Target not found.
    pub const NOT_FOUND: Status = Status(2, 3);
    /// Unsupported version.
    pub const BAD_VERSION: Status = Status(2, 5);
    /// Missing parameter.
    pub const MISSING_PARAMETER: Status = Status(2, 7);
    /// Session does not exist.
    pub const NO_SESSION: Status = Status(2, 0x0a);
    /// Invalid request during login.
    pub const INVALID_DURING_LOGIN: Status = Status(2, 0x0b);
    /// Target error.
    pub const TARGET_ERROR: Status = Status(3, 0);
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod chosen yet.
    Start,
    /// CHAP chosen, waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent, waiting for CHAP_N/CHAP_R.
    ChapResponse { id: u8, challenge: [u8; 16] },
    /// Authenticated (or none needed).
    Done,
}

/// One connection's login.
pub struct Login {
    provider: Arc<dyn LunProvider>,
    next_tsih: u16,
    first: Option<LoginRequest>,
    initiator: Option<String>,
    session_type: SessionType,
    target: Option<String>,
    access: TargetAccess,
    auth: Auth,
    params: Params,
    stat_sn: u32,
    exp_cmd_sn: u32,
    sent_tpgt: bool,
    pending: Vec<u8>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("initiator", &self.initiator)
            .field("target", &self.target)
            .finish()
    }
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The CHAP response for `id`, `secret` and `challenge` (RFC 1994 §4.1: MD5 over the
/// identifier, the secret and the challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    md5(&[&[id], secret, challenge])
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Login {
    /// A login on a new connection. `tsih` is the session handle given on success.
    pub fn new(provider: Arc<dyn LunProvider>, tsih: u16) -> Login {
        Login {
            provider,
            next_tsih: tsih.max(1),
            first: None,
            initiator: None,
            session_type: SessionType::Normal,
            target: None,
            access: TargetAccess::default(),
            auth: Auth::Start,
            params: Params::default(),
            stat_sn: rand::random::<u32>() & 0x00ff_ffff,
            exp_cmd_sn: 0,
            sent_tpgt: false,
            pending: Vec::new(),
        }
    }

    fn respond(
        &mut self,
        req: &LoginRequest,
        transit: bool,
        nsg: Stage,
        status: Status,
        keys: TextPairs,
    ) -> Pdu {
        let ok = status == Status::OK;
        let resp = LoginResponse {
            transit: ok && transit,
            continue_: false,
            csg: req.csg,
            nsg: if ok && transit { nsg } else { Stage::Security },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: if ok && transit && nsg == Stage::FullFeature {
                self.next_tsih
            } else {
                0
            },
            itt: req.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(super::session::CMD_WINDOW - 1),
            status_class: status.0,
            status_detail: status.1,
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        Pdu::new(
            Bhs::LoginResponse(resp),
            if ok { keys.to_bytes() } else { Vec::new() },
        )
    }

    fn fail(&mut self, req: &LoginRequest, status: Status, why: &str) -> Step {
        tracing::warn!(initiator = ?self.initiator, target = ?self.target, class = status.0, detail = status.1, "login refused: {why}");
        Step::Fail(self.respond(req, false, Stage::Security, status, TextPairs::default()))
    }

    /// Handles one Login Request.
    pub fn on_request(&mut self, req: &LoginRequest, data: &[u8]) -> Step {
        if self.first.is_none() {
            if req.version_min > 0 {
                return self.fail(req, Status::BAD_VERSION, "version");
            }
            if req.tsih != 0 {
                return self.fail(
                    req,
                    Status::NO_SESSION,
                    "adding a connection to a session is not supported",
                );
            }
            self.exp_cmd_sn = req.cmd_sn;
            self.first = Some(req.clone());
        } else if let Some(first) = &self.first {
            if first.isid != req.isid || first.itt != req.itt {
                return self.fail(
                    req,
                    Status::INVALID_DURING_LOGIN,
                    "ISID or ITT changed during login",
                );
            }
        }
        // A text split over several PDUs (C bit): gather, answer with an empty response.
        if self.pending.len() + data.len() > 64 * 1024 {
            return self.fail(req, Status::INITIATOR_ERROR, "login text too long");
        }
        self.pending.extend_from_slice(data);
        if req.continue_ {
            let resp = self.respond(req, false, req.csg, Status::OK, TextPairs::default());
            return Step::Continue(resp);
        }
        let text = std::mem::take(&mut self.pending);
        let keys = match TextPairs::parse(&text) {
            Ok(k) => k,
            Err(e) => return self.fail(req, Status::INITIATOR_ERROR, &e.to_string()),
        };
        if req.csg == Stage::FullFeature || (req.transit && req.nsg == Stage::Security) {
            return self.fail(req, Status::INITIATOR_ERROR, "invalid stage transition");
        }
        if self.initiator.is_none() {
            if let Err(step) = self.leading(req, &keys) {
                return step;
            }
        }
        let mut out = TextPairs::default();
        if self.session_type == SessionType::Normal && !self.sent_tpgt {
            out.push("TargetPortalGroupTag", "1");
            self.sent_tpgt = true;
        }
        let needs_chap = self.access.chap.is_some() && self.session_type == SessionType::Normal;
        if req.csg == Stage::Security {
            if let Err(step) = self.security(req, &keys, needs_chap, &mut out) {
                return step;
            }
        } else if self.auth != Auth::Done {
            if needs_chap {
                return self.fail(
                    req,
                    Status::AUTH_FAILED,
                    "operational stage before authentication",
                );
            }
            self.auth = Auth::Done;
        }
        for (k, v) in &keys.0 {
            if let Some(reply) = self.negotiate(k, v) {
                out.push(k.clone(), reply);
            }
        }
        if req.csg == Stage::Operational || (req.transit && req.nsg == Stage::FullFeature) {
            // Declarative: tell the initiator how much we take, once, when it matters.
            if !out.0.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength")
                && keys.get("MaxRecvDataSegmentLength").is_some()
            {
                out.push("MaxRecvDataSegmentLength", TARGET_MAX_RECV.to_string());
            }
        }
        let can_transit = req.transit && self.auth == Auth::Done;
        let resp = self.respond(req, can_transit, req.nsg, Status::OK, out);
        if can_transit && req.nsg == Stage::FullFeature {
            let est = Established {
                session_type: self.session_type,
                initiator: self.initiator.clone().unwrap_or_default(),
                target: self.target.clone(),
                params: self.params.clone(),
                isid: req.isid,
                tsih: self.next_tsih,
                exp_cmd_sn: self.exp_cmd_sn,
                stat_sn: self.stat_sn,
            };
            tracing::info!(initiator = %est.initiator, target = ?est.target, "login complete");
            return Step::Done(resp, Box::new(est));
        }
        Step::Continue(resp)
    }

    /// Checks the keys only the first request carries.
    fn leading(&mut self, req: &LoginRequest, keys: &TextPairs) -> Result<(), Step> {
        let Some(initiator) = keys.get("InitiatorName").filter(|s| !s.is_empty()) else {
            return Err(self.fail(req, Status::MISSING_PARAMETER, "no InitiatorName"));
        };
        self.initiator = Some(initiator.to_owned());
        self.session_type = match keys.get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(self.fail(req, Status::INITIATOR_ERROR, "bad SessionType")),
        };
        if self.session_type == SessionType::Normal {
            let Some(target) = keys.get("TargetName").filter(|s| !s.is_empty()) else {
                return Err(self.fail(req, Status::MISSING_PARAMETER, "no TargetName"));
            };
            self.target = Some(target.to_owned());
            let Some(access) = self.provider.access(target) else {
                return Err(self.fail(req, Status::NOT_FOUND, "no such target"));
            };
            if !access.allows(initiator) {
                return Err(self.fail(
                    req,
                    Status::FORBIDDEN,
                    "initiator not allowed on this target",
                ));
            }
            self.access = access;
        }
        Ok(())
    }

    fn security(
        &mut self,
        req: &LoginRequest,
        keys: &TextPairs,
        needs_chap: bool,
        out: &mut TextPairs,
    ) -> Result<(), Step> {
        if let Some(methods) = keys.get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let choice = if needs_chap {
                offered.contains(&"CHAP").then_some("CHAP")
            } else if offered.contains(&"None") {
                Some("None")
            } else {
                None
            };
            match choice {
                Some("CHAP") => {
                    self.auth = Auth::ChapAlgorithm;
                    out.push("AuthMethod", "CHAP");
                }
                Some(_) => {
                    self.auth = Auth::Done;
                    out.push("AuthMethod", "None");
                }
                None if needs_chap => {
                    return Err(self.fail(req, Status::AUTH_FAILED, "CHAP required, not offered"))
                }
                None => {
                    return Err(self.fail(req, Status::AUTH_FAILED, "no acceptable AuthMethod"))
                }
            }
        } else if self.auth == Auth::Start {
            if needs_chap {
                return Err(self.fail(
                    req,
                    Status::AUTH_FAILED,
                    "CHAP required, no AuthMethod offered",
                ));
            }
            self.auth = Auth::Done;
        }
        if let Some(algs) = keys.get("CHAP_A") {
            if self.auth != Auth::ChapAlgorithm {
                return Err(self.fail(req, Status::INITIATOR_ERROR, "CHAP_A out of sequence"));
            }
            if !algs.split(',').any(|a| a == "5") {
                return Err(self.fail(req, Status::AUTH_FAILED, "CHAP without MD5"));
            }
            let id: u8 = rand::random();
            let challenge: [u8; 16] = rand::random();
            out.push("CHAP_A", "5");
            out.push("CHAP_I", id.to_string());
            out.push("CHAP_C", format!("0x{}", hex::encode(challenge)));
            self.auth = Auth::ChapResponse { id, challenge };
        } else if let (Some(name), Some(resp)) = (keys.get("CHAP_N"), keys.get("CHAP_R")) {
            let Auth::ChapResponse { id, challenge } = self.auth.clone() else {
                return Err(self.fail(req, Status::INITIATOR_ERROR, "CHAP_R out of sequence"));
            };
            let Some(creds) = self.access.chap.clone() else {
                return Err(self.fail(req, Status::AUTH_FAILED, "no CHAP secret"));
            };
            let expected = chap_response(id, &creds.secret, &challenge);
            let got = parse_binary(resp).unwrap_or_default();
            if name != creds.user || !ct_eq(&got, &expected) {
                return Err(self.fail(req, Status::AUTH_FAILED, "wrong CHAP name or response"));
            }
            // Mutual CHAP: the initiator challenges us back (RFC 7143 §12.1.3).
            if let (Some(iid), Some(ic)) = (keys.get("CHAP_I"), keys.get("CHAP_C")) {
                let Some(ours) = self.access.target_chap.clone() else {
                    return Err(self.fail(
                        req,
                        Status::AUTH_FAILED,
                        "mutual CHAP asked, no target secret",
                    ));
                };
                let (Some(iid), Some(ic)) = (
                    parse_number(iid).and_then(|n| u8::try_from(n).ok()),
                    parse_binary(ic),
                ) else {
                    return Err(self.fail(req, Status::AUTH_FAILED, "bad CHAP_I or CHAP_C"));
                };
                if ic == challenge || ic.is_empty() || ic.len() > 1024 {
                    return Err(self.fail(
                        req,
                        Status::AUTH_FAILED,
                        "reflected or bad CHAP challenge",
                    ));
                }
                let r = chap_response(iid, &ours.secret, &ic);
                out.push("CHAP_N", ours.user);
                out.push("CHAP_R", format!("0x{}", hex::encode(r)));
            }
            self.auth = Auth::Done;
        } else if matches!(self.auth, Auth::ChapResponse { .. }) && req.transit {
            return Err(self.fail(req, Status::AUTH_FAILED, "no CHAP response"));
        }
        Ok(())
    }

    /// Negotiates one key; `Some(reply)` for keys that need an answer.
    fn negotiate(&mut self, key: &str, value: &str) -> Option<String> {
        let num = |lo: u64, hi: u64| parse_number(value).filter(|n| (lo..=hi).contains(n));
        let yes_no = || match value {
            "Yes" => Some(true),
            "No" => Some(false),
            _ => None,
        };
        let p = &mut self.params;
        let reply = match key {
            // Declarative or handled elsewhere.
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" | "AuthMethod"
            | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => return None,
            "HeaderDigest" | "DataDigest" => {
                let pick = value.split(',').find(|v| *v == "None" || *v == "CRC32C");
                let on = pick == Some("CRC32C");
                if key == "HeaderDigest" {
                    p.header_digest = on;
                } else {
                    p.data_digest = on;
                }
                pick.unwrap_or("Reject").to_owned()
            }
            "MaxRecvDataSegmentLength" => {
                match num(512, u64::from(super::pdu::MAX_DATA_SEGMENT_LEN)) {
                    Some(n) => p.initiator_max_recv = n as u32,
                    None => return Some("Reject".into()),
                }
                TARGET_MAX_RECV.to_string()
            }
            "MaxBurstLength" => match num(512, u64::from(super::pdu::MAX_DATA_SEGMENT_LEN)) {
                Some(n) => {
                    p.max_burst = (n as u32).min(TARGET_MAX_BURST);
                    p.max_burst.to_string()
                }
                None => "Reject".into(),
            },
            "FirstBurstLength" => match num(512, u64::from(super::pdu::MAX_DATA_SEGMENT_LEN)) {
                Some(n) => {
                    p.first_burst = (n as u32).min(TARGET_FIRST_BURST);
                    p.first_burst.to_string()
                }
                None => "Reject".into(),
            },
            "InitialR2T" => match yes_no() {
                // OR function; ours is No, so the result is theirs.
                Some(v) => {
                    p.initial_r2t = v;
                    value.to_owned()
                }
                None => "Reject".into(),
            },
            "ImmediateData" => match yes_no() {
                // AND function; ours is Yes.
                Some(v) => {
                    p.immediate_data = v;
                    value.to_owned()
                }
                None => "Reject".into(),
            },
            "MaxOutstandingR2T" => match num(1, 65535) {
                Some(_) => {
                    p.max_outstanding_r2t = 1;
                    "1".into()
                }
                None => "Reject".into(),
            },
            "MaxConnections" => match num(1, 65535) {
                Some(_) => "1".into(),
                None => "Reject".into(),
            },
            "ErrorRecoveryLevel" => match num(0, 2) {
                Some(_) => "0".into(),
                None => "Reject".into(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no() {
                // OR function; ours is Yes.
                Some(_) => "Yes".into(),
                None => "Reject".into(),
            },
            "DefaultTime2Wait" => match num(0, 3600) {
                Some(n) => n.max(2).to_string(),
                None => "Reject".into(),
            },
            "DefaultTime2Retain" => match num(0, 3600) {
                // ErrorRecoveryLevel 0: nothing to retain.
                Some(_) => "0".into(),
                None => "Reject".into(),
            },
            "IFMarker" | "OFMarker" => "No".into(),
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => "Irrelevant".into(),
            _ => "NotUnderstood".into(),
        };
        if self.session_type == SessionType::Discovery
            && matches!(
                key,
                "MaxBurstLength"
                    | "FirstBurstLength"
                    | "InitialR2T"
                    | "ImmediateData"
                    | "MaxOutstandingR2T"
                    | "DataPDUInOrder"
                    | "DataSequenceInOrder"
                    | "MaxConnections"
            )
        {
            // Irrelevant in a discovery session (RFC 7143 §13).
            return Some("Irrelevant".into());
        }
        Some(reply)
    }
}

/// Whether `creds` would accept `response` to (`id`, `challenge`): for tests and tools.
pub fn chap_verify(creds: &ChapCredentials, id: u8, challenge: &[u8], response: &[u8]) -> bool {
    ct_eq(&chap_response(id, &creds.secret, challenge), response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::lun::{Backing, MemDevice, StaticLuns};

    fn provider(chap: bool) -> Arc<dyn LunProvider> {
        let mut p = StaticLuns::new();
        let access = TargetAccess {
            chap: chap.then(|| ChapCredentials {
                user: "node1".into(),
                secret: b"secret-node-1".to_vec(),
            }),
            target_chap: chap.then(|| ChapCredentials {
                user: "tgt".into(),
                secret: b"target-secret".to_vec(),
            }),
            initiators: vec![],
        };
        p.insert(
            "iqn.t:one",
            access,
            Backing::Shared(Arc::new(MemDevice::new(8, 512, false))),
        );
        Arc::new(p)
    }

    fn req(csg: Stage, nsg: Stage, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            continue_: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [1; 6],
            tsih: 0,
            itt: 7,
            cid: 0,
            cmd_sn: 5,
            exp_stat_sn: 0,
        }
    }

    fn text(p: &Pdu) -> TextPairs {
        TextPairs::parse(&p.data).unwrap()
    }

    fn status(p: &Pdu) -> (u8, u8) {
        match &p.bhs {
            Bhs::LoginResponse(r) => (r.status_class, r.status_detail),
            _ => panic!("not a login response"),
        }
    }

    #[test]
    fn login_without_auth_straight_to_full_feature() {
        let mut l = Login::new(provider(false), 3);
        let step = l.on_request(&req(Stage::Security, Stage::FullFeature, true), b"InitiatorName=iqn.i\0TargetName=iqn.t:one\0AuthMethod=None\0HeaderDigest=CRC32C,None\0MaxRecvDataSegmentLength=65536\0X-foo=1\0");
        let Step::Done(p, est) = step else {
            panic!("{step:?}")
        };
        let t = text(&p);
        assert_eq!(t.get("AuthMethod"), Some("None"));
        assert_eq!(t.get("HeaderDigest"), Some("CRC32C"));
        assert_eq!(t.get("TargetPortalGroupTag"), Some("1"));
        assert_eq!(t.get("X-foo"), Some("NotUnderstood"));
        assert!(est.params.header_digest);
        assert_eq!(est.params.initiator_max_recv, 65536);
        assert_eq!(est.exp_cmd_sn, 5);
        let Bhs::LoginResponse(r) = &p.bhs else {
            panic!()
        };
        assert_eq!((r.transit, r.nsg, r.tsih), (true, Stage::FullFeature, 3));
    }

    #[test]
    fn unknown_target_and_missing_names() {
        let mut l = Login::new(provider(false), 1);
        let Step::Fail(p) = l.on_request(
            &req(Stage::Security, Stage::Operational, true),
            b"InitiatorName=i\0TargetName=iqn.nope\0",
        ) else {
            panic!()
        };
        assert_eq!(status(&p), (2, 3));
        let mut l = Login::new(provider(false), 1);
        let Step::Fail(p) = l.on_request(
            &req(Stage::Security, Stage::Operational, true),
            b"TargetName=iqn.t:one\0",
        ) else {
            panic!()
        };
        assert_eq!(status(&p), (2, 7));
    }

    fn chap_login(secret: &[u8], mutual: bool) -> (Login, Step) {
        let mut l = Login::new(provider(true), 1);
        let Step::Continue(p) = l.on_request(
            &req(Stage::Security, Stage::Operational, false),
            b"InitiatorName=i\0TargetName=iqn.t:one\0AuthMethod=CHAP,None\0",
        ) else {
            panic!()
        };
        assert_eq!(text(&p).get("AuthMethod"), Some("CHAP"));
        let Step::Continue(p) = l.on_request(
            &req(Stage::Security, Stage::Operational, false),
            b"CHAP_A=5\0",
        ) else {
            panic!()
        };
        let t = text(&p);
        let id = parse_number(t.get("CHAP_I").unwrap()).unwrap() as u8;
        let c = parse_binary(t.get("CHAP_C").unwrap()).unwrap();
        let r = chap_response(id, secret, &c);
        let mut body = format!("CHAP_N=node1\0CHAP_R=0x{}\0", hex::encode(r));
        if mutual {
            body.push_str("CHAP_I=9\0CHAP_C=0x00112233445566778899aabbccddeeff\0");
        }
        let step = l.on_request(
            &req(Stage::Security, Stage::Operational, true),
            body.as_bytes(),
        );
        (l, step)
    }

    #[test]
    fn chap_accepts_the_right_secret_and_proves_ours() {
        let (_, step) = chap_login(b"secret-node-1", true);
        let Step::Continue(p) = step else {
            panic!("{step:?}")
        };
        let t = text(&p);
        assert_eq!(t.get("CHAP_N"), Some("tgt"));
        let want = chap_response(
            9,
            b"target-secret",
            &hex::decode("00112233445566778899aabbccddeeff").unwrap(),
        );
        assert_eq!(parse_binary(t.get("CHAP_R").unwrap()).unwrap(), want);
        let Bhs::LoginResponse(r) = &p.bhs else {
            panic!()
        };
        assert!(r.transit);
    }

    #[test]
    fn chap_refuses_a_wrong_secret() {
        let (_, step) = chap_login(b"wrong", false);
        let Step::Fail(p) = step else {
            panic!("{step:?}")
        };
        assert_eq!(status(&p), (2, 1));
    }

    #[test]
    fn chap_cannot_be_skipped() {
        let mut l = Login::new(provider(true), 1);
        let Step::Fail(p) = l.on_request(
            &req(Stage::Operational, Stage::FullFeature, true),
            b"InitiatorName=i\0TargetName=iqn.t:one\0",
        ) else {
            panic!()
        };
        assert_eq!(status(&p), (2, 1));
        let mut l = Login::new(provider(true), 1);
        let Step::Fail(p) = l.on_request(
            &req(Stage::Security, Stage::FullFeature, true),
            b"InitiatorName=i\0TargetName=iqn.t:one\0AuthMethod=None\0",
        ) else {
            panic!()
        };
        assert_eq!(status(&p), (2, 1));
    }
}
