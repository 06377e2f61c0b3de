//! Resume: a session that reconnects after a disconnect and loses nothing.
//!
//! Guarantees, given a server that keeps its side of the protocol:
//! - every Send is retried with the same client message id until a ServerAck
//!   (or a non-fatal Error naming it) arrives; the server dedupes on
//!   (sender device, client message id) and answers a retry with the original
//!   ServerAck, so a retry never makes a second copy;
//! - inbox entries (Deliver, Receipt) are surfaced once: an entry whose
//!   sequence is at or below the highest already surfaced is a redelivery,
//!   acknowledged again and dropped;
//! - the session pings when it has sent nothing for a third of the server's
//!   idle timeout, as long as someone is waiting in `next_event`;
//! - after GoAway REPLACED it does not reconnect: `next_event` fails with
//!   `ClientError::GoAway` (two copies of one device would evict each other).
//!
//! Over Noise, every reconnect after the first login uses IK to the server
//! key the last session used (the one the first XX proved, or the current
//! key the server announced during a rotation), kept in
//! [`ReconnectingSession::credentials`] as `server_key`. A server that
//! proves a different key ends the reconnecting with
//! [`ClientError::ServerKeyChanged`]: retrying would not change the key.
//! A login that bound the credentials' Noise key drops their secret.
//!
//! Acks and read receipts queued while disconnected are lost; acks are
//! recovered by redelivery (and the automatic re-ack), read receipts are not.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::sync::Semaphore;
use rand::Rng;

use super::{ClientError, ConnectOptions, Credentials, Event, Session};
use crate::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
use crate::proto::{ErrorCode, GoAwayReason};

/// How a [`ReconnectingSession`] retries.
#[derive(Clone, Debug)]
pub struct ReconnectOptions {
    /// First wait after a disconnect; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Largest wait between attempts.
    pub backoff_max: Duration,
    /// Failed attempts in a row before `next_event` gives up; `None`: never.
    pub attempts_max: Option<u32>,
    /// Sends kept for resume until ServerAcked; past it `send` fails with
    /// `QueueFull`.
    pub unacked_sends_max: usize,
    /// Ping after this long without sending; `None`: a third of the Welcome's
    /// idle timeout.
    pub ping_interval: Option<Duration>,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            attempts_max: None,
            unacked_sends_max: 4096,
            ping_interval: None,
        }
    }
}

/// A device session that survives disconnects (see the module docs).
pub struct ReconnectingSession {
    /// As given, without `server_key`: the pin lives in `credentials`.
    connect: ConnectOptions,
    /// As given, then updated after each login (see [`after_login`]).
    credentials: RefCell<Credentials>,
    options: ReconnectOptions,
    session: RefCell<Option<Rc<Session>>>,
    /// Sends not yet answered, by client message id, for resume.
    unacked: RefCell<BTreeMap<u64, (UserId, Outgoing)>>,
    /// Highest inbox sequence surfaced.
    highest_seen: Cell<u64>,
    reconnects: Cell<u64>,
    failed_attempts: Cell<u32>,
    /// Earliest time of the next connection attempt.
    next_attempt_at: Cell<Instant>,
    last_sent_at: Cell<Instant>,
    ping_nonce: Cell<u64>,
    /// Set by GoAway REPLACED (another session of this device logged in, and
    /// reconnecting would only replace it in turn) or DEVICE_REMOVED (its
    /// credentials no longer work): no more reconnects.
    ended: Cell<Option<GoAwayReason>>,
    reconnect_turn: Semaphore,
}

/// What an unanswered Send carried.
#[derive(Clone, Debug)]
enum Outgoing {
    One(Bytes),
    PerDevice(Vec<(DeviceId, Bytes)>),
    /// To a group (its id), one payload.
    Group(u64, Bytes),
}

impl Outgoing {
    fn queue(&self, session: &Session, to: UserId, id: ClientMessageId) -> Result<(), ClientError> {
        match self {
            Outgoing::One(payload) => session.send(to, id, payload.clone()),
            Outgoing::PerDevice(parts) => session.send_to_devices(to, id, parts),
            Outgoing::Group(group, payload) => session.send_to_group(*group, id, payload.clone()),
        }
    }
}

/// The credentials to log in with after `session` logged in with
/// `credentials`: the server key it used is the pin, and a bound Noise key
/// makes the secret useless.
fn after_login(credentials: &Credentials, session: &Session) -> Credentials {
    let mut after = if session.bound_noise_key() {
        credentials.key_bound()
    } else {
        credentials.clone()
    };
    if let Some(key) = session.server_key() {
        after.server_key = Some(key);
    }
    after
}

fn is_permanent(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::AuthFailed
            | ErrorCode::NotAuthenticated
            | ErrorCode::UnsupportedVersion
            | ErrorCode::RegistrationClosed
            | ErrorCode::BadRegistrationToken
    )
}

impl ReconnectingSession {
    /// Connects once (errors are returned as they are) and keeps the
    /// parameters for later reconnects. A pin in `connect.server_key`
    /// overrides the credentials' one, as in [`Session::connect`].
    pub async fn connect(
        connect: &ConnectOptions,
        credentials: &Credentials,
        options: ReconnectOptions,
    ) -> Result<ReconnectingSession, ClientError> {
        let session = Session::connect(connect, credentials).await?;
        let mut credentials = after_login(credentials, &session);
        if session.server_key().is_none() {
            credentials.server_key = connect.server_key.or(credentials.server_key);
        }
        let now = Instant::now();
        Ok(ReconnectingSession {
            connect: ConnectOptions {
                server_key: None,
                ..connect.clone()
            },
            credentials: RefCell::new(credentials),
            options,
            session: RefCell::new(Some(Rc::new(session))),
            unacked: RefCell::new(BTreeMap::new()),
            highest_seen: Cell::new(0),
            reconnects: Cell::new(0),
            failed_attempts: Cell::new(0),
            next_attempt_at: Cell::new(now),
            last_sent_at: Cell::new(now),
            ping_nonce: Cell::new(0),
            ended: Cell::new(None),
            reconnect_turn: Semaphore::new(1),
        })
    }

    /// The current session, if connected.
    pub fn current(&self) -> Option<Rc<Session>> {
        self.session.borrow().clone()
    }

    /// The credentials the next reconnect logs in with: those given, with
    /// the server key the last session used as `server_key` and without
    /// the secret once a login bound the Noise key. A caller that keeps
    /// credentials in a file saves these when they change.
    pub fn credentials(&self) -> Credentials {
        self.credentials.borrow().clone()
    }

    /// The user and device this session logs in as.
    pub fn device(&self) -> (UserId, DeviceId) {
        let credentials = self.credentials.borrow();
        (credentials.user, credentials.device)
    }

    /// Successful reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    /// Sends waiting for their ServerAck.
    pub fn unacked_sends(&self) -> usize {
        self.unacked.borrow().len()
    }

    /// The highest inbox sequence surfaced by `next_event`.
    pub fn highest_seen(&self) -> InboxSeq {
        InboxSeq(self.highest_seen.get())
    }

    fn disconnect(&self) {
        if self.session.borrow_mut().take().is_some() {
            self.next_attempt_at
                .set(Instant::now() + self.options.backoff_initial.min(self.options.backoff_max));
        }
    }

    fn with_session(
        &self,
        f: impl FnOnce(&Session) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let session = self.current().ok_or(ClientError::Closed)?;
        let result = f(&session);
        if result.is_ok() {
            self.last_sent_at.set(Instant::now());
        }
        result
    }

    /// Queues a Send and remembers it until answered; sent now if connected,
    /// else on reconnect.
    pub fn send(&self, to: UserId, id: ClientMessageId, payload: Bytes) -> Result<(), ClientError> {
        self.send_outgoing(to, id, Outgoing::One(payload))
    }

    /// Queues a Send with one payload per device of the recipient; resent
    /// like `send` until answered.
    pub fn send_to_devices(
        &self,
        to: UserId,
        id: ClientMessageId,
        parts: Vec<(DeviceId, Bytes)>,
    ) -> Result<(), ClientError> {
        self.send_outgoing(to, id, Outgoing::PerDevice(parts))
    }

    /// Queues a Send to a group; resent like `send` until answered.
    pub fn send_to_group(
        &self,
        group: u64,
        id: ClientMessageId,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        self.send_outgoing(UserId(0), id, Outgoing::Group(group, payload))
    }

    /// Queues CreateGroup; `Err(Closed)` while disconnected.
    pub fn create_group(
        &self,
        request_id: u64,
        name: &str,
        members: &[UserId],
    ) -> Result<(), ClientError> {
        self.with_session(|s| s.create_group(request_id, name, members))
    }

    /// Queues RequestLinkCode; `Err(Closed)` while disconnected.
    pub fn request_link_code(&self) -> Result<(), ClientError> {
        self.with_session(|s| s.request_link_code())
    }

    /// Queues RequestMediaGrant for an upload; `Err(Closed)` while
    /// disconnected.
    pub fn request_upload_grant(&self, request_id: u64, size: u64) -> Result<(), ClientError> {
        self.with_session(|s| s.request_upload_grant(request_id, size))
    }

    /// Queues RequestMediaGrant for a download; `Err(Closed)` while
    /// disconnected.
    pub fn request_download_grant(
        &self,
        request_id: u64,
        blob: &[u8; 32],
    ) -> Result<(), ClientError> {
        self.with_session(|s| s.request_download_grant(request_id, blob))
    }

    /// Queues ListDevices; `Err(Closed)` while disconnected.
    pub fn list_devices(&self) -> Result<(), ClientError> {
        self.with_session(|s| s.list_devices())
    }

    /// Queues RemoveDevice; `Err(Closed)` while disconnected.
    pub fn remove_device(&self, device: DeviceId) -> Result<(), ClientError> {
        self.with_session(|s| s.remove_device(device))
    }

    fn send_outgoing(
        &self,
        to: UserId,
        id: ClientMessageId,
        outgoing: Outgoing,
    ) -> Result<(), ClientError> {
        {
            let unacked = self.unacked.borrow();
            if unacked.len() >= self.options.unacked_sends_max && !unacked.contains_key(&id.0) {
                return Err(ClientError::QueueFull);
            }
        }
        if let Some(session) = self.current() {
            match outgoing.queue(&session, to, id) {
                Ok(()) => self.last_sent_at.set(Instant::now()),
                Err(ClientError::QueueFull) => return Err(ClientError::QueueFull),
                // Closed: it goes out on reconnect.
                Err(_) => self.disconnect(),
            }
        }
        self.unacked.borrow_mut().insert(id.0, (to, outgoing));
        Ok(())
    }

    /// Queues an Ack up to `up_to`; `Err(Closed)` while disconnected (the
    /// entries are redelivered and acked again after the reconnect).
    pub fn ack(&self, up_to: InboxSeq) -> Result<(), ClientError> {
        self.with_session(|s| s.ack(up_to))
    }

    /// Queues an Ack of individual sequences (see [`ReconnectingSession::ack`]).
    pub fn ack_list(&self, seqs: &[InboxSeq]) -> Result<(), ClientError> {
        self.with_session(|s| s.ack_list(seqs))
    }

    /// Queues a ReadReceipt; `Err(Closed)` while disconnected.
    pub fn read_receipt(
        &self,
        sender: UserId,
        sender_device: DeviceId,
        ids: &[ClientMessageId],
    ) -> Result<(), ClientError> {
        self.with_session(|s| s.read_receipt(sender, sender_device, ids))
    }

    /// Writes what is queued. A broken connection is not an error here: the
    /// next `next_event` reconnects and resends.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if let Some(session) = self.current() {
            if session.flush().await.is_err() {
                self.disconnect();
            }
        }
        Ok(())
    }

    /// Connects if disconnected, waiting out the backoff; resends unanswered
    /// Sends. Errors only when reconnecting is hopeless (bad credentials,
    /// attempts exhausted, the session was replaced by a newer one). Cancel safe: the backoff state lives in `self`.
    pub async fn ensure_connected(&self) -> Result<Rc<Session>, ClientError> {
        let _turn = self
            .reconnect_turn
            .acquire_permit(1)
            .await
            .map_err(|_| ClientError::Closed)?;
        loop {
            if let Some(session) = self.current() {
                return Ok(session);
            }
            if let Some(reason) = self.ended.get() {
                return Err(ClientError::GoAway {
                    reason,
                    reconnect_after_ms: 0,
                });
            }
            let wait = self
                .next_attempt_at
                .get()
                .saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
            let credentials = self.credentials();
            match Session::connect(&self.connect, &credentials).await {
                Ok(session) => {
                    *self.credentials.borrow_mut() = after_login(&credentials, &session);
                    let session = Rc::new(session);
                    self.failed_attempts.set(0);
                    self.reconnects.set(self.reconnects.get() + 1);
                    *self.session.borrow_mut() = Some(session.clone());
                    self.last_sent_at.set(Instant::now());
                    if self.resend(&session).await.is_err() || session.flush().await.is_err() {
                        self.disconnect();
                        continue;
                    }
                    return Ok(session);
                }
                // Retrying would meet the same key, or the same missing
                // secret.
                Err(e @ (ClientError::ServerKeyChanged { .. } | ClientError::NoSecret)) => {
                    return Err(e)
                }
                Err(e) => {
                    if let Some(code) = e.server_code() {
                        if is_permanent(code) {
                            return Err(e);
                        }
                    }
                    let failed = self.failed_attempts.get() + 1;
                    self.failed_attempts.set(failed);
                    if self.options.attempts_max.is_some_and(|max| failed >= max) {
                        return Err(e);
                    }
                    let mut delay = self.backoff(failed);
                    if let ClientError::Server(error) = &e {
                        delay = delay.max(Duration::from_millis(error.retry_after_ms.into()));
                    }
                    if let ClientError::GoAway {
                        reconnect_after_ms, ..
                    } = &e
                    {
                        delay = delay.max(Duration::from_millis((*reconnect_after_ms).into()));
                    }
                    self.next_attempt_at.set(Instant::now() + delay);
                }
            }
        }
    }

    /// Exponential backoff with jitter (half to all of the step), so many
    /// clients cut off together do not come back together.
    fn backoff(&self, failed: u32) -> Duration {
        let step = self
            .options
            .backoff_initial
            .saturating_mul(1u32 << failed.min(16))
            .min(self.options.backoff_max);
        let millis = step.as_millis().max(1) as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
    }

    /// Queues every unanswered Send again, flushing whenever the output
    /// queue is full, so any number of them goes out.
    async fn resend(&self, session: &Session) -> Result<(), ClientError> {
        let pending: Vec<(u64, UserId, Outgoing)> = self
            .unacked
            .borrow()
            .iter()
            .map(|(id, (to, outgoing))| (*id, *to, outgoing.clone()))
            .collect();
        for (id, to, outgoing) in pending {
            loop {
                match outgoing.queue(session, to, ClientMessageId(id)) {
                    Ok(()) => break,
                    Err(ClientError::QueueFull) => session.flush().await?,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn ping_interval(&self, session: &Session) -> Duration {
        self.options.ping_interval.unwrap_or_else(|| {
            let idle_ms = session.welcome().idle_timeout_ms.max(3);
            Duration::from_millis(u64::from(idle_ms / 3))
        })
    }

    /// The next event worth showing: reconnects as needed, drops
    /// redeliveries (re-acking them), pings when quiet. A GoAway or fatal
    /// Error is surfaced once and followed by a reconnect on the next call.
    /// Cancel safe.
    pub async fn next_event(&self) -> Result<Event, ClientError> {
        loop {
            let session = self.ensure_connected().await?;
            let ping_at = self.last_sent_at.get() + self.ping_interval(&session);
            let received =
                futures_lite::future::or(async { Some(session.next_event().await) }, async {
                    glommio::timer::sleep(ping_at.saturating_duration_since(Instant::now())).await;
                    None
                })
                .await;
            let event = match received {
                None => {
                    let nonce = self.ping_nonce.get() + 1;
                    self.ping_nonce.set(nonce);
                    if session.ping(nonce).is_ok() {
                        self.last_sent_at.set(Instant::now());
                    }
                    self.flush().await?;
                    continue;
                }
                Some(Err(_)) => {
                    self.disconnect();
                    continue;
                }
                Some(Ok(event)) => event,
            };
            match &event {
                Event::ServerAck(ack) => {
                    self.unacked.borrow_mut().remove(&ack.client_message_id);
                }
                Event::Error(error) => {
                    if error.client_message_id != 0 && !error.fatal {
                        self.unacked.borrow_mut().remove(&error.client_message_id);
                    }
                    if error.fatal {
                        // A permanent refusal shows up again on reconnect
                        // and ends `ensure_connected` with that error.
                        self.disconnect();
                        self.next_attempt_at.set(
                            Instant::now()
                                + Duration::from_millis(error.retry_after_ms.into())
                                    .max(self.options.backoff_initial),
                        );
                    }
                }
                Event::GoAway(go_away) => {
                    self.disconnect();
                    let reason = go_away.reason();
                    if matches!(reason, GoAwayReason::Replaced | GoAwayReason::DeviceRemoved) {
                        self.ended.set(Some(reason));
                    }
                    self.next_attempt_at.set(
                        Instant::now() + Duration::from_millis(go_away.reconnect_after_ms.into()),
                    );
                }
                Event::Deliver(d) => {
                    if self.is_redelivery(&session, d.sequence) {
                        self.flush().await?;
                        continue;
                    }
                }
                Event::Receipt(r) => {
                    if self.is_redelivery(&session, r.sequence) {
                        self.flush().await?;
                        continue;
                    }
                }
                Event::Pong(_)
                | Event::LinkCode(_)
                | Event::DeviceList(_)
                | Event::DeviceRemoved(_)
                | Event::GroupInfo(_)
                | Event::PrekeysStored(_)
                | Event::PrekeyBundle(_)
                | Event::PrekeysLow(_)
                | Event::Typing(_)
                | Event::PresenceUpdate(_)
                | Event::Privacy(_)
                | Event::PushRegistered(_)
                | Event::MediaGrant(_) => {}
            }
            return Ok(event);
        }
    }

    /// Records `sequence` as seen; true (after queueing an ack) if it was seen before.
    fn is_redelivery(&self, session: &Session, sequence: u64) -> bool {
        if sequence <= self.highest_seen.get() {
            if session.ack_list(&[InboxSeq(sequence)]).is_ok() {
                self.last_sent_at.set(Instant::now());
            }
            return true;
        }
        self.highest_seen.set(sequence);
        false
    }
}
