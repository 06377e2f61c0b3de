//! Where a bridge connects, and from which address (pure functions).
//!
//! The bridge is a client of the server's own client listener. The shards
//! know a connection's peer only by its address, which keys the failed-login
//! throttle and picks the shard that checks a Hello (`route::address_home`).
//! If every bridge connected from 127.0.0.1, every browser would share one
//! login budget (one browser guessing would lock out all the others) and
//! every browser Hello would be checked on one shard; the bridges would also
//! share one address's ~28,000 ephemeral ports toward the listener, a hard
//! cap on browsers. So a bridge to a loopback listener connects from an
//! address in 127.0.0.0/8 (all of which is local on Linux) chosen by a keyed
//! hash of the browser's address: each browser address keeps a budget of its
//! own (two that collide, about one pair in 16 million, share one), and the
//! port space is per source address.

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The address the bridge connects to: the client listener's, with an
/// unspecified address (`0.0.0.0`, `::`) replaced by loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The local address a bridge for a browser at `peer` binds before it
/// connects to `target`: an address in 127.1.0.0–127.254.255.255 (never
/// 127.0.0.x, which local tools use, nor the broadcast end of the block)
/// picked by `hasher` from `peer`, when `target` is an IPv4 loopback
/// address. `None` otherwise (IPv6 has one loopback address, and a source
/// in 127/8 cannot reach a non-loopback listener): the kernel then picks
/// the source, shared by every bridge.
pub fn source(peer: IpAddr, target: SocketAddr, hasher: &impl BuildHasher) -> Option<IpAddr> {
    let IpAddr::V4(target) = target.ip() else {
        return None;
    };
    if !target.is_loopback() {
        return None;
    }
    // An IPv4 peer seen on a dual-stack socket is the same browser.
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let hash = hasher.hash_one(peer);
    let second = 1 + (hash % 254) as u8;
    let [.., third, fourth] = (hash >> 8).to_be_bytes();
    Some(IpAddr::V4(Ipv4Addr::new(127, second, third, fourth)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasherDefault, DefaultHasher};

    type Fixed = BuildHasherDefault<DefaultHasher>;

    #[test]
    fn targets_loopback_for_an_unspecified_listener() {
        let t = |s: &str| target(s.parse().unwrap()).to_string();
        assert_eq!(t("0.0.0.0:7700"), "127.0.0.1:7700");
        assert_eq!(t("[::]:7700"), "[::1]:7700");
        assert_eq!(t("127.0.0.1:7700"), "127.0.0.1:7700");
        assert_eq!(t("10.1.2.3:7700"), "10.1.2.3:7700");
    }

    #[test]
    fn spreads_browsers_over_127_slash_8_away_from_127_0_and_the_broadcast_end() {
        let target: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let mut seen = HashSet::new();
        for i in 0..10_000u32 {
            let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let Some(IpAddr::V4(source)) = source(peer, target, &Fixed::default()) else {
                panic!("an IPv4 loopback target gets a source");
            };
            let [a, b, ..] = source.octets();
            assert_eq!(a, 127);
            assert!((1..=254).contains(&b), "{source}");
            seen.insert(source);
        }
        assert!(seen.len() > 9_990, "{} distinct sources", seen.len());
    }

    #[test]
    fn one_browser_keeps_its_source_and_a_mapped_v4_peer_is_the_same_browser() {
        let target: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let hasher = std::collections::hash_map::RandomState::new();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let first = source(v4, target, &hasher);
        assert_eq!(first, source(v4, target, &hasher));
        assert_eq!(first, source(mapped, target, &hasher));
    }

    #[test]
    fn leaves_the_source_to_the_kernel_off_ipv4_loopback() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        for target in ["[::1]:7700", "10.1.2.3:7700"] {
            assert_eq!(
                source(peer, target.parse().unwrap(), &Fixed::default()),
                None
            );
        }
    }
}
