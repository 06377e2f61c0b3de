use super::*;
use crate::engine::testing::{device, Fixture};
use crate::engine::Event;

fn updates(frames: Vec<Frame>) -> Vec<(u64, bool, u64)> {
    frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::PresenceUpdate(u) => Some((u.user_id, u.online, u.last_seen_ms)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_flap_inside_the_grace_period_tells_nobody() {
    let mut fx = Fixture::new(0, 1);
    fx.open(1, 10);
    fx.frame(
        1,
        10,
        Frame::SubscribePresence(pb::SubscribePresence { user_ids: vec![2] }),
    );
    assert_eq!(updates(fx.host.take_frames(10)), vec![(2, false, 0)]);
    fx.open(2, 20);
    assert_eq!(updates(fx.host.take_frames(10)), vec![(2, true, 0)]);
    let grace = u64::from(fx.engine.limits().presence_grace_ms);
    // Gone and back within the grace period: nothing.
    fx.handle(Event::Closed {
        device: device(2),
        session: 20,
    });
    fx.clock.advance_ms(grace / 2);
    fx.handle(Event::Tick);
    fx.open(2, 21);
    fx.clock.advance_ms(grace);
    fx.handle(Event::Tick);
    assert!(updates(fx.host.take_frames(10)).is_empty());
    // Gone for good: offline once the grace period is over.
    let left = crate::store::Clock::now_ms(&*fx.clock);
    fx.handle(Event::Closed {
        device: device(2),
        session: 21,
    });
    fx.clock.advance_ms(grace - 1);
    fx.handle(Event::Tick);
    assert!(updates(fx.host.take_frames(10)).is_empty());
    fx.clock.advance_ms(1);
    fx.handle(Event::Tick);
    assert_eq!(updates(fx.host.take_frames(10)), vec![(2, false, left)]);
    assert!(!fx.engine.presence_due());
    // The follower's session closes: its watch goes.
    fx.handle(Event::Closed {
        device: device(1),
        session: 10,
    });
    fx.open(2, 22);
    assert!(fx.host.take_frames(10).is_empty());
}
