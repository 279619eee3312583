//! The lease table of the full DHCP server (RFC 2131 §4.3): an in-memory model, pure and
//! time-parameterised (`now` in Unix seconds), whose every durable change is returned as a
//! [`LeaseChange`] for the [`super::store::LeaseStore`] to persist before the reply goes out.
//!
//! Leases are keyed by hardware address (`chaddr`), not by client identifier: firmware PXE,
//! iPXE and the booted OS send different client identifiers for the same NIC, and a node
//! keeps one address through all its boot stages.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use wire::dhcp::MacAddr;

use super::config::PoolConfig;

/// State of an address record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Leased to `mac` until `expires` (after which it is free, but kept so the same client
    /// gets the same address back).
    Bound,
    /// DECLINEd by `mac` (in use by someone else on the wire): not handed out until `expires`.
    Declined,
}

impl LeaseState {
    /// The name stored in SQLite.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Bound => "bound",
            LeaseState::Declined => "declined",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bound" => Some(LeaseState::Bound),
            "declined" => Some(LeaseState::Declined),
            _ => None,
        }
    }
}

/// One address record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// The client holding (or having declined) it.
    pub mac: MacAddr,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Bound or declined.
    pub state: LeaseState,
    /// Host name the client sent (option 12), if any.
    pub hostname: Option<String>,
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Insert or replace the record for `lease.ip`.
    Upsert(Lease),
    /// Forget the record for this address.
    Delete(Ipv4Addr),
}

/// Addresses, leases, reservations and outstanding offers.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    pool: PoolConfig,
    server_ip: Ipv4Addr,
    by_ip: BTreeMap<Ipv4Addr, Lease>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    reserved_ip: HashMap<Ipv4Addr, MacAddr>,
    reserved_mac: HashMap<MacAddr, Ipv4Addr>,
    /// mac → (address, hold expiry).
    offers: HashMap<MacAddr, (Ipv4Addr, u64)>,
}

impl LeaseTable {
    /// A table over a validated pool, starting from persisted records (records outside the
    /// subnet, or for a reserved address held by another MAC, are dropped).
    pub fn new(pool: PoolConfig, server_ip: Ipv4Addr, records: Vec<Lease>) -> Self {
        let reserved_ip = pool.reservations.iter().map(|r| (r.ip, r.mac)).collect();
        let reserved_mac = pool.reservations.iter().map(|r| (r.mac, r.ip)).collect();
        let mut t = LeaseTable {
            pool,
            server_ip,
            by_ip: BTreeMap::new(),
            by_mac: HashMap::new(),
            reserved_ip,
            reserved_mac,
            offers: HashMap::new(),
        };
        for l in records {
            let owner_ok = t.reserved_ip.get(&l.ip).is_none_or(|m| *m == l.mac);
            if t.pool.subnet.contains(l.ip) && owner_ok {
                t.insert(l);
            }
        }
        t
    }

    /// The pool configuration.
    pub fn pool(&self) -> &PoolConfig {
        &self.pool
    }

    fn insert(&mut self, l: Lease) {
        if let Some(old) = self.by_ip.get(&l.ip) {
            if self.by_mac.get(&old.mac) == Some(&l.ip) {
                self.by_mac.remove(&old.mac);
            }
        }
        if l.state == LeaseState::Bound {
            if let Some(prev_ip) = self.by_mac.insert(l.mac, l.ip) {
                if prev_ip != l.ip {
                    // One address per MAC: the old record stays (expired-looking) only in SQLite
                    // until replaced; drop it here so the address is free.
                    self.by_ip.remove(&prev_ip);
                }
            }
        }
        self.by_ip.insert(l.ip, l);
    }

    /// The record for an address.
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The address record bound to a MAC (expired or not).
    pub fn lease_of(&self, mac: MacAddr) -> Option<&Lease> {
        self.by_mac.get(&mac).and_then(|ip| self.by_ip.get(ip))
    }

    /// All records.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    /// The reservation of a MAC.
    pub fn reservation(&self, mac: MacAddr) -> Option<&super::config::Reservation> {
        self.pool.reservations.iter().find(|r| r.mac == mac)
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.pool.pool_start)..=u32::from(self.pool.pool_end)).contains(&u32::from(ip))
    }

    /// True when `ip` may be given to `mac` at `now`.
    pub fn available_to(&self, ip: Ipv4Addr, mac: MacAddr, now: u64) -> bool {
        let s = &self.pool.subnet;
        if !s.contains(ip) || ip == s.network() || ip == s.broadcast() || ip == self.server_ip {
            return false;
        }
        // A client with a reservation gets that address and no other.
        if let Some(own) = self.reserved_mac.get(&mac) {
            return *own == ip;
        }
        match self.reserved_ip.get(&ip) {
            Some(owner) => return *owner == mac,
            None if !self.in_pool(ip) => return false,
            None => {}
        }
        if let Some(l) = self.by_ip.get(&ip) {
            let live = l.expires > now;
            match l.state {
                LeaseState::Declined if live => return false,
                LeaseState::Bound if live && l.mac != mac => return false,
                _ => {}
            }
        }
        !self
            .offers
            .iter()
            .any(|(m, (o, until))| *o == ip && *m != mac && *until > now)
    }

    /// The address to offer `mac` (RFC 2131 §4.3.1 order: reservation, current or previous
    /// binding, outstanding offer, requested address, then any free pool address).
    pub fn pick(&self, mac: MacAddr, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(ip) = self.reserved_mac.get(&mac) {
            return Some(*ip);
        }
        let candidates = [
            self.by_mac.get(&mac).copied(),
            self.offers.get(&mac).map(|(ip, _)| *ip),
            requested,
        ];
        if let Some(ip) = candidates
            .into_iter()
            .flatten()
            .find(|ip| self.available_to(*ip, mac, now))
        {
            return Some(ip);
        }
        let (start, end) = (
            u32::from(self.pool.pool_start),
            u32::from(self.pool.pool_end),
        );
        // Prefer addresses never used (or whose record is gone), then expired ones, oldest first.
        let mut expired: Option<(u64, Ipv4Addr)> = None;
        for n in start..=end {
            let ip = Ipv4Addr::from(n);
            if !self.available_to(ip, mac, now) {
                continue;
            }
            match self.by_ip.get(&ip) {
                None => return Some(ip),
                Some(l) => {
                    if expired.is_none_or(|(e, _)| l.expires < e) {
                        expired = Some((l.expires, ip));
                    }
                }
            }
        }
        if expired.is_some() {
            return expired.map(|(_, ip)| ip);
        }
        // Pool full: an offer is not a commitment (RFC 2131 §4.3.1 "SHOULD" reserve), so take
        // back the oldest outstanding offer rather than let a DISCOVER flood starve clients.
        self.offers
            .iter()
            .filter(|(m, _)| **m != mac)
            .map(|(_, (ip, until))| (*until, *ip))
            .filter(|(_, ip)| {
                self.by_ip.get(ip).is_none_or(|l| l.expires <= now)
                    && !self.reserved_ip.contains_key(ip)
            })
            .min()
            .map(|(_, ip)| ip)
    }

    /// Records an offer of `ip` to `mac` (held in memory only: an offer is not a lease).
    pub fn offer(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) {
        let hold = self.pool.offer_hold.as_secs();
        self.offers.retain(|m, (o, _)| *o != ip || *m == mac);
        self.offers.insert(mac, (ip, now.saturating_add(hold)));
        // Bound the table: drop expired offers when it grows.
        if self.offers.len() > 4096 {
            self.offers.retain(|_, (_, until)| *until > now);
        }
    }

    /// Forgets an offer (the client chose another server).
    pub fn withdraw_offer(&mut self, mac: MacAddr) {
        self.offers.remove(&mac);
    }

    /// Binds `ip` to `mac` for the lease time; returns the changes to persist.
    pub fn bind(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        hostname: Option<String>,
        now: u64,
    ) -> Vec<LeaseChange> {
        let mut changes = Vec::new();
        if let Some(prev) = self.by_mac.get(&mac).copied() {
            if prev != ip {
                changes.push(LeaseChange::Delete(prev));
            }
        }
        let lease = Lease {
            ip,
            mac,
            expires: now.saturating_add(self.pool.lease_time.as_secs()),
            state: LeaseState::Bound,
            hostname,
        };
        self.offers.remove(&mac);
        self.insert(lease.clone());
        changes.push(LeaseChange::Upsert(lease));
        changes
    }

    /// RELEASE: ends `mac`'s lease on `ip` (kept as an expired record for affinity).
    pub fn release(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) -> Vec<LeaseChange> {
        match self.by_ip.get_mut(&ip) {
            Some(l) if l.mac == mac && l.state == LeaseState::Bound && l.expires > now => {
                l.expires = now;
                vec![LeaseChange::Upsert(l.clone())]
            }
            _ => Vec::new(),
        }
    }

    /// DECLINE: `ip` is in use on the wire; keep it out of use for the decline hold time.
    pub fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) -> Vec<LeaseChange> {
        let s = &self.pool.subnet;
        if !s.contains(ip) {
            return Vec::new();
        }
        // A DECLINE cannot take away another client's live lease.
        if let Some(l) = self.by_ip.get(&ip) {
            if l.mac != mac && l.state == LeaseState::Bound && l.expires > now {
                return Vec::new();
            }
        }
        let lease = Lease {
            ip,
            mac,
            expires: now.saturating_add(self.pool.decline_hold.as_secs()),
            state: LeaseState::Declined,
            hostname: None,
        };
        if self.by_mac.get(&mac) == Some(&ip) {
            self.by_mac.remove(&mac);
        }
        self.offers.remove(&mac);
        self.insert(lease.clone());
        vec![LeaseChange::Upsert(lease)]
    }

    /// Forgets declined records whose hold has passed; returns the deletions to persist.
    pub fn sweep(&mut self, now: u64) -> Vec<LeaseChange> {
        self.offers.retain(|_, (_, until)| *until > now);
        let gone: Vec<Ipv4Addr> = self
            .by_ip
            .values()
            .filter(|l| l.state == LeaseState::Declined && l.expires <= now)
            .map(|l| l.ip)
            .collect();
        gone.into_iter()
            .map(|ip| {
                self.by_ip.remove(&ip);
                LeaseChange::Delete(ip)
            })
            .collect()
    }
}
