//! Connections that are upgraded but not yet authenticated: the legacy path
//! where the session token comes as `api_key` in the first message.
//!
//! Until its token is verified, such a connection holds no
//! `server.max_streams` slot. It holds a place in a pool of its own instead,
//! bounded per shard (`limits.max_unauthenticated`) and per client address
//! across the process (`limits.max_unauthenticated_per_address`), and it has
//! `limits.idle_timeout` in all (pings do not extend it) to send its first
//! message. So silent or pinging connections without a token cannot take the
//! places of authenticated streams.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// One shard's count of unauthenticated connections (its thread only).
#[derive(Debug, Default)]
pub struct ShardPool {
    open: Cell<u32>,
}

impl ShardPool {
    /// Unauthenticated connections on this shard now.
    pub fn open(&self) -> u32 {
        self.open.get()
    }
}

/// Unauthenticated connections by client address, across every shard.
/// Locked only when such a connection opens or ends, never per frame.
#[derive(Debug, Default)]
pub struct AddressPool {
    by_address: Mutex<HashMap<IpAddr, u32>>,
}

/// Why an unauthenticated connection was refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The shard's pool is full.
    Shard,
    /// The client's address holds its share already.
    Address,
}

/// A place in the pool; given back when dropped (the first message came,
/// or the connection ended).
#[derive(Debug)]
pub struct Place {
    shard: Rc<crate::dataplane::shard::Shard>,
    address: Option<(Arc<crate::dataplane::shard::ProcessState>, IpAddr)>,
}

/// Takes a place for an unauthenticated connection from `peer` on `shard`,
/// with at most `per_shard` on the shard and `per_address` from one address.
pub fn admit(
    shard: &Rc<crate::dataplane::shard::Shard>,
    peer: Option<IpAddr>,
    per_shard: usize,
    per_address: usize,
) -> Result<Place, Full> {
    let pool = &shard.unauthenticated;
    if pool.open.get() as usize >= per_shard {
        return Err(Full::Shard);
    }
    let address = match peer {
        Some(ip) => {
            let process = &shard.process;
            let mut map = process
                .unauthenticated
                .by_address
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n as usize >= per_address {
                if *n == 0 {
                    map.remove(&ip);
                }
                return Err(Full::Address);
            }
            *n += 1;
            Some((process.clone(), ip))
        }
        None => None,
    };
    pool.open.set(pool.open.get() + 1);
    Ok(Place {
        shard: shard.clone(),
        address,
    })
}

impl Drop for Place {
    fn drop(&mut self) {
        let pool = &self.shard.unauthenticated;
        pool.open.set(pool.open.get().saturating_sub(1));
        if let Some((process, ip)) = &self.address {
            let mut map = process
                .unauthenticated
                .by_address
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

/// The client's address as the pool counts it: an IPv4 address; an
/// IPv4-mapped IPv6 address as the IPv4 address; any other IPv6 address
/// as its /64, the network a subscriber is given and picks addresses from
/// at will (counted by address, one IPv6 client could take every place).
pub fn address_of(peer: std::net::SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::address_of;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let of = |s: &str| address_of(s.parse().unwrap()).to_string();
        assert_eq!(of("192.0.2.7:1"), "192.0.2.7");
        assert_eq!(of("[::ffff:192.0.2.7]:1"), "192.0.2.7");
        assert_eq!(of("[2001:db8:1:2:3:4:5:6]:1"), "2001:db8:1:2::");
        assert_eq!(of("[::1]:1"), "::");
    }
}
