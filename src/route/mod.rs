//! Routing: which shard owns a user or group, and the messages shards send
//! each other.
//!
//! `shard_for` is the documented, stable placement function: the 64-bit
//! finalizer of SplitMix64 (a bijective mixer) over the id, reduced with a
//! multiply-shift onto `[0, shards)`. It is pure, has no state and is the same
//! on every shard and every release; changing it moves every user's home, so
//! it is part of the on-disk contract (a shard's log holds its users' inboxes).

use crate::ids::{ShardId, UserId};

pub mod message;

/// Mixes a 64-bit id so that consecutive ids spread evenly across shards.
pub fn mix64(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The home shard of a user (or a group, by its id) among `shards` shards.
///
/// # Panics
/// If `shards` is 0: a server always has at least one shard.
pub fn shard_for(id: u64, shards: u32) -> ShardId {
    assert!(shards > 0, "shard count must be positive");
    let reduced = ((mix64(id) as u128 * shards as u128) >> 64) as u32;
    ShardId(reduced)
}

/// The home shard of a user.
pub fn home_shard(user: UserId, shards: u32) -> ShardId {
    shard_for(user.0, shards)
}

/// The shard that keeps the failed-login count of a client address, so one
/// address has one budget for the whole server wherever the kernel's
/// SO_REUSEPORT hash lands its connections. `shard_for` over the address
/// folded to 64 bits: an IPv4 address is its 32-bit value, an IPv6 address
/// the XOR of its two halves (an IPv4-mapped one counts as the IPv4).
pub fn address_home(address: std::net::IpAddr, shards: u32) -> ShardId {
    let key = match address {
        std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4)),
            None => {
                let bits = u128::from(v6);
                (bits >> 64) as u64 ^ bits as u64
            }
        },
    };
    shard_for(key, shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn placement_is_stable_across_releases() {
        // Golden values: a change here moves users between shards' logs.
        assert_eq!(shard_for(1, 2), ShardId(1));
        assert_eq!(shard_for(2, 2), ShardId(1));
        let golden: Vec<u32> = (1..=8).map(|id| shard_for(id, 4).0).collect();
        assert_eq!(golden, vec![2, 2, 0, 1, 1, 2, 1, 2]);
    }

    #[test]
    fn spreads_sequential_ids_evenly() {
        let shards = 4u32;
        let mut counts = [0u32; 4];
        for id in 1..=40_000u64 {
            counts[shard_for(id, shards).0 as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "uneven: {counts:?}");
        }
    }

    proptest! {
        #[test]
        fn always_in_range(id in any::<u64>(), shards in 1u32..1024) {
            prop_assert!(shard_for(id, shards).0 < shards);
        }

        #[test]
        fn one_shard_takes_everything(id in any::<u64>()) {
            prop_assert_eq!(shard_for(id, 1), ShardId(0));
        }
    }
}
