//! The `group` scenario's plan: who is in which group, who sends to it, what
//! a group message's payload carries, and how a step's offered messages
//! spread over the groups and the worker processes.
//!
//! **Membership.** `groups` groups of `members` users each, over `users`
//! users (one connection each). The groups take the users in order, wrapping
//! around the end of the list: member `j` of group `g` is user
//! `(g × members + j) mod users`. With at least `groups × members` users the
//! groups are disjoint; with fewer, every user is in
//! `⌊groups × members / users⌋` or one more groups.
//!
//! **Senders.** One member of each group creates it (Switchboard:
//! CreateGroup, so it is the group's admin) and is its only sender: member
//! `w mod members`, where `w` is how many times the list had wrapped before
//! the group began. Disjoint groups are sent to by their first user; four
//! groups of all 1,024 users by users 0, 1, 2 and 3. Message `k` of a
//! worker's schedule goes to the `k mod n`-th of the `n` groups that worker
//! sends for, so the offered rate is spread evenly over the groups. Every
//! member but the sender gets each message: `members − 1` deliveries per
//! group message on both targets (Switchboard skips the sending device; on
//! MQTT the sender does not subscribe to its own group's topic, since MQTT
//! 3.1.1 would echo a publish to a subscribed publisher).
//!
//! Pure logic: no I/O, no executor; the coordinator and the workers compute
//! the same figures from the same plan.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::latency::Schedule;
use crate::link::PAYLOAD_HEADER_BYTES;

/// Who is in which group (see the module header); sent to every worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlan {
    /// Users of the run, global indices `0..users`.
    pub users: u64,
    pub groups: u32,
    /// Members per group, the sender included.
    pub members: u32,
    /// The first client message id of every sender, and one more than the
    /// last id every member has already seen: the same in every worker
    /// process, so a member in one process counts a sender's first message
    /// from another (ids from an earlier run are lower, and count as
    /// duplicates).
    pub msg_id_base: u64,
}

impl GroupPlan {
    /// A plan, or why the numbers do not make one.
    pub fn new(
        users: u64,
        groups: u32,
        members: u32,
        msg_id_base: u64,
    ) -> anyhow::Result<GroupPlan> {
        anyhow::ensure!(groups >= 1, "--groups must be at least 1");
        anyhow::ensure!(
            members >= 2,
            "--members must be at least 2 (the sender and one recipient)"
        );
        anyhow::ensure!(
            u64::from(members) <= users,
            "--members {members} exceeds the {users} users (-n): a user is in a group once"
        );
        anyhow::ensure!(msg_id_base >= 1, "message ids start at 1");
        Ok(GroupPlan {
            users,
            groups,
            members,
            msg_id_base,
        })
    }

    /// The user that is member `index` of `group`.
    pub fn member(&self, group: u32, index: u32) -> u64 {
        assert!(index < self.members, "member index within the group");
        (u64::from(group) * u64::from(self.members) + u64::from(index)) % self.users
    }

    /// Which member of `group` creates it and sends to it.
    pub fn sender_index(&self, group: u32) -> u32 {
        let wraps = u64::from(group) * u64::from(self.members) / self.users;
        (wraps % u64::from(self.members)) as u32
    }

    /// Deliveries one group message makes: every member but the sender.
    pub fn deliveries_per_message(&self) -> u64 {
        u64::from(self.members) - 1
    }

    /// Group memberships per user, on average (the sender's included).
    pub fn memberships_per_user(&self) -> f64 {
        f64::from(self.groups) * f64::from(self.members) / self.users as f64
    }

    /// The groups of the `count` users starting at global user `first` (one
    /// worker's share).
    pub fn local(&self, first: u64, count: usize) -> LocalGroups {
        let mut local = LocalGroups {
            receives: vec![Vec::new(); count],
            sends: Vec::new(),
        };
        let range = first..first + count as u64;
        for group in 0..self.groups {
            let sender = self.sender_index(group);
            for index in 0..self.members {
                let user = self.member(group, index);
                if !range.contains(&user) {
                    continue;
                }
                let at = (user - first) as usize;
                if index == sender {
                    local.sends.push(SenderGroup { group, local: at });
                } else {
                    local.receives[at].push(group);
                }
            }
        }
        local
    }
}

/// A group whose sender is one of a worker's users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderGroup {
    pub group: u32,
    /// The sender's index among the worker's users.
    pub local: usize,
}

/// One worker's view of the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalGroups {
    /// Per local user, ascending: the groups it receives from (it is a
    /// member and not the sender).
    pub receives: Vec<Vec<u32>>,
    /// The groups a local user sends for, ascending by group.
    pub sends: Vec<SenderGroup>,
}

impl LocalGroups {
    /// Group memberships of the worker's users, senders included: how many
    /// "group created" events its devices get (Switchboard).
    pub fn memberships(&self) -> u64 {
        self.receives.iter().map(|g| g.len() as u64).sum::<u64>() + self.sends.len() as u64
    }
}

/// One worker's part of a step at total rate `rate_per_s`: the groups it
/// sends for get `rate × their count / groups` messages per second.
pub fn worker_rate_per_s(plan: &GroupPlan, local: &LocalGroups, rate_per_s: f64) -> f64 {
    rate_per_s * local.sends.len() as f64 / f64::from(plan.groups)
}

/// Messages one worker's schedule holds in a step of `duration_s` at total
/// rate `rate_per_s`. Computed once, by the coordinator, and handed to the
/// worker with the step: the count is a floor of a product of floats, which
/// a rate that went through JSON text could move by one.
pub fn worker_messages(
    plan: &GroupPlan,
    local: &LocalGroups,
    rate_per_s: f64,
    duration_s: f64,
) -> u64 {
    let rate = worker_rate_per_s(plan, local, rate_per_s);
    if local.sends.is_empty() || rate <= 0.0 {
        return 0;
    }
    Schedule::new(0, rate, duration_s).count
}

/// Messages each group is offered in a step: every worker's
/// [`worker_messages`], its message `k` to the `k mod n`-th of its `n`
/// groups. Indexed by group.
pub fn offered_per_group(
    plan: &GroupPlan,
    workers: &[LocalGroups],
    rate_per_s: f64,
    duration_s: f64,
) -> Vec<u64> {
    let mut offered = vec![0u64; plan.groups as usize];
    for local in workers {
        let senders = local.sends.len() as u64;
        let count = worker_messages(plan, local, rate_per_s, duration_s);
        if count == 0 {
            continue;
        }
        for (position, sender) in local.sends.iter().enumerate() {
            offered[sender.group as usize] +=
                count / senders + u64::from((position as u64) < count % senders);
        }
    }
    offered
}

/// Deliveries a worker's users should see when every offered message is
/// sent: one per message of every group they receive from.
pub fn deliveries_expected(local: &LocalGroups, offered_per_group: &[u64]) -> u64 {
    local
        .receives
        .iter()
        .flatten()
        .map(|&group| offered_per_group[group as usize])
        .sum()
}

const GROUP_PAYLOAD_MAGIC: u32 = 0x5342_4731; // "SBG1"

/// What a group message's payload carries so each member can time it and
/// tell it from a duplicate: the first [`PAYLOAD_HEADER_BYTES`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    pub group: u32,
    pub msg_id: u64,
    /// `CLOCK_MONOTONIC` time the message was due.
    pub scheduled_ns: u64,
}

impl GroupHeader {
    /// A payload of `size_bytes` (at least the header) starting with `self`.
    pub fn encode(&self, size_bytes: usize) -> Bytes {
        let size = size_bytes.max(PAYLOAD_HEADER_BYTES);
        let mut out = BytesMut::with_capacity(size);
        out.put_u32(GROUP_PAYLOAD_MAGIC);
        out.put_u64(u64::from(self.group));
        out.put_u64(self.msg_id);
        out.put_u64(self.scheduled_ns);
        out.resize(size, 0xa5);
        out.freeze()
    }

    /// The header of a group message's payload; `None` for anything else
    /// (a p2p payload, a system message's empty one).
    pub fn decode(mut payload: &[u8]) -> Option<GroupHeader> {
        if payload.len() < PAYLOAD_HEADER_BYTES || payload.get_u32() != GROUP_PAYLOAD_MAGIC {
            return None;
        }
        let group = u32::try_from(payload.get_u64()).ok()?;
        Some(GroupHeader {
            group,
            msg_id: payload.get_u64(),
            scheduled_ns: payload.get_u64(),
        })
    }
}

/// The last message id a member saw from each group it receives from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberSeen {
    /// (group, last message id), ascending by group.
    last: Vec<(u32, u64)>,
}

impl MemberSeen {
    /// A member of `groups` (ascending) that has seen nothing from `plan`'s
    /// senders yet.
    pub fn new(groups: &[u32], plan: &GroupPlan) -> MemberSeen {
        MemberSeen {
            last: groups.iter().map(|&g| (g, plan.msg_id_base - 1)).collect(),
        }
    }

    /// Whether `header` is a new message of a group this member receives
    /// from (and remembers it); false for a duplicate, a message left from
    /// an earlier run, or a group the member is not in. A group's messages
    /// come in the sender's order (one group order for every member), so
    /// "new" is "a higher id than the last one".
    pub fn take(&mut self, header: &GroupHeader) -> bool {
        let Ok(at) = self.last.binary_search_by_key(&header.group, |&(g, _)| g) else {
            return false;
        };
        let last = &mut self.last[at].1;
        if header.msg_id <= *last {
            return false;
        }
        *last = header.msg_id;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(users: u64, groups: u32, members: u32) -> GroupPlan {
        GroupPlan::new(users, groups, members, 1_000).unwrap()
    }

    /// The user that creates and sends to `group`.
    fn sender(p: &GroupPlan, group: u32) -> u64 {
        p.member(group, p.sender_index(group))
    }

    #[test]
    fn disjoint_groups_when_users_suffice() {
        let p = plan(100, 4, 8);
        let members: Vec<u64> = (0..4)
            .flat_map(|g| (0..8).map(move |j| (g, j)))
            .map(|(g, j)| p.member(g, j))
            .collect();
        assert_eq!(members, (0..32).collect::<Vec<u64>>());
        assert_eq!(sender(&p, 3), 24);
        assert_eq!(p.deliveries_per_message(), 7);
    }

    #[test]
    fn groups_of_every_user_start_one_apart() {
        let p = plan(1024, 4, 1024);
        assert_eq!(
            (0..4).map(|g| sender(&p, g)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // Every group holds every user once.
        for g in 0..4 {
            let mut users: Vec<u64> = (0..1024).map(|j| p.member(g, j)).collect();
            users.sort_unstable();
            assert_eq!(users, (0..1024).collect::<Vec<u64>>());
        }
    }

    #[test]
    fn wrapping_groups_spread_memberships_evenly() {
        let p = plan(1000, 8, 256);
        let local = p.local(0, 1000);
        let per_user: Vec<usize> = (0..1000)
            .map(|u| local.receives[u].len() + local.sends.iter().filter(|s| s.local == u).count())
            .collect();
        assert_eq!(per_user.iter().sum::<usize>(), 8 * 256);
        assert!(
            per_user.iter().all(|&n| (2..=3).contains(&n)),
            "{per_user:?}"
        );
        // Group 3 (users 768..1023) wraps: groups 4..7 send from member 1.
        let senders: Vec<u64> = (0..8).map(|g| sender(&p, g)).collect();
        assert_eq!(senders, vec![0, 256, 512, 768, 25, 281, 537, 793]);
    }

    #[test]
    fn rejects_groups_larger_than_the_users() {
        assert!(GroupPlan::new(10, 1, 11, 1).is_err());
        assert!(GroupPlan::new(10, 1, 1, 1).is_err());
        assert!(GroupPlan::new(10, 0, 2, 1).is_err());
        assert!(GroupPlan::new(10, 1, 10, 1).is_ok());
    }

    #[test]
    fn a_worker_sees_only_its_users() {
        let p = plan(40, 5, 8);
        let second = p.local(20, 20);
        // Groups 2 (users 16..24), 3 (24..32) and 4 (32..40).
        assert_eq!(
            second.sends,
            vec![
                SenderGroup { group: 3, local: 4 },
                SenderGroup {
                    group: 4,
                    local: 12
                }
            ]
        );
        assert_eq!(second.receives[0], vec![2]);
        assert_eq!(second.receives[4], Vec::<u32>::new());
        assert_eq!(second.receives[5], vec![3]);
        // Group 2's last four members, 7 of group 3's, 7 of group 4's, and
        // the two senders.
        assert_eq!(second.memberships(), 4 + 7 + 7 + 2);
    }

    #[test]
    fn offered_messages_spread_over_groups_and_workers() {
        let p = plan(40, 5, 8);
        let workers = [p.local(0, 20), p.local(20, 20)];
        // Worker 0 sends for groups 0, 1, 2 (3/5 of the rate), worker 1 for 3, 4.
        assert!((worker_rate_per_s(&p, &workers[0], 100.0) - 60.0).abs() < 1e-9);
        let offered = offered_per_group(&p, &workers, 100.0, 1.0);
        assert_eq!(offered, vec![20, 20, 20, 20, 20]);
        assert_eq!(offered.iter().sum::<u64>(), 100);
        // Uneven counts: 7 messages over 3 groups are 3, 2, 2.
        // (Worker 0's 3 of 5 groups at 5 msg/s for 2.5 s.)
        let offered = offered_per_group(&p, &workers[..1], 5.0, 2.5);
        assert_eq!(offered[..3], [3, 2, 2]);
        // Worker 1 receives from 4 members of group 2 and 7 of 3 and 4 each.
        let offered = offered_per_group(&p, &workers, 100.0, 1.0);
        assert_eq!(deliveries_expected(&workers[1], &offered), (4 + 7 + 7) * 20);
        let all: u64 = workers
            .iter()
            .map(|w| deliveries_expected(w, &offered))
            .sum();
        assert_eq!(all, 100 * p.deliveries_per_message());
    }

    #[test]
    fn group_header_round_trips_and_is_not_a_p2p_header() {
        let header = GroupHeader {
            group: 7,
            msg_id: 9,
            scheduled_ns: 123,
        };
        for size in [0, 28, 100] {
            let bytes = header.encode(size);
            assert_eq!(bytes.len(), size.max(PAYLOAD_HEADER_BYTES));
            assert_eq!(GroupHeader::decode(&bytes), Some(header));
        }
        let p2p = crate::link::PayloadHeader {
            sender_index: 7,
            msg_id: 9,
            scheduled_ns: 123,
        }
        .encode(100);
        assert_eq!(GroupHeader::decode(&p2p), None);
        assert_eq!(GroupHeader::decode(b""), None);
    }

    #[test]
    fn a_member_counts_each_new_message_once() {
        let p = plan(40, 5, 8);
        let mut seen = MemberSeen::new(&[1, 3], &p);
        let header = |group, msg_id| GroupHeader {
            group,
            msg_id,
            scheduled_ns: 0,
        };
        assert!(seen.take(&header(1, 1_000)));
        assert!(!seen.take(&header(1, 1_000)), "a duplicate");
        assert!(seen.take(&header(3, 1_000)), "another group's own order");
        assert!(seen.take(&header(1, 1_005)));
        assert!(!seen.take(&header(1, 1_003)), "older than the last");
        assert!(!seen.take(&header(3, 999)), "from an earlier run");
        assert!(!seen.take(&header(2, 2_000)), "not a member of group 2");
    }
}
