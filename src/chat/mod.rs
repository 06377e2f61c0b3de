//! `switchboard chat`: an interactive terminal client.
//!
//! A person registers (or logs in with the credentials in the profile file),
//! picks a peer with `/to USER` and types lines. Incoming messages are printed
//! with sender and time, acknowledged, and answered with a read receipt once
//! shown. Each sent message's state is printed as it changes:
//! `[#3 → 12] ✓ sent`, `[#3 → 12] ✓✓ delivered`, `[#3 → 12] ✓✓ read`.
//! ✓✓ means every device of the recipient has it: a recipient with linked
//! devices gets one payload per device (the server's DEVICE_MISMATCH answer
//! tells the chat which devices there are; it then sends again to each).
//! `/link` on a primary prints a code; `chat --link CODE` on a new profile
//! makes that profile a linked device of the account. What one device sends
//! is copied to the account's other devices it knows of, shown there as
//! `(you → USER) text`.
//!
//! Threads: the glommio executor runs the session and the chat loop; stdin is
//! read by a second thread (blocking reads) that feeds lines to it through a
//! bounded glommio shared channel. The logic (commands, message states, line
//! formats) is sans-IO in [`state`]. Payloads are sent as plain UTF-8: this
//! terminal client does no end-to-end encryption.
//!
//! The connection to the server is Noise by default (`--plaintext` for local
//! development). The server's key is trusted as SSH trusts a host key (see
//! [`pin`]): pinned in the profile at first contact and printed as a
//! fingerprint, used for IK on later runs, re-pinned with a note when the
//! server announces a rotation, and a different key is refused until
//! `--accept-new-server-key`. A profile from before Noise (a secret, no key)
//! gets a fresh Noise key bound to its device at its first Noise login; the
//! profile is saved before that login and again after it (without the
//! secret, which no longer logs in).

pub mod media;
pub mod pin;
pub mod state;

use std::future::Future;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use glommio::channels::shared_channel;
use glommio::LocalExecutorBuilder;

use crate::client::{
    link, register, ClientError, ConnectOptions, Credentials, Event, ReconnectOptions,
    ReconnectingSession,
};
use crate::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
use crate::noise::fingerprint;
use crate::proto::{pb, ErrorCode};
use state::{format_incoming, parse_command, Command, Outbox, Recipients, HELP};

/// Lines typed ahead of the chat loop; the stdin thread waits when full.
const STDIN_LINES_QUEUED_MAX: usize = 64;

/// At exit, how long to wait for ServerAcks of messages already sent.
const EXIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// At exit, how long to wait for files still being sent or fetched.
const EXIT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Arguments of `switchboard chat`.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = "\
The connection is encrypted with Noise. At first contact the server's key \
fingerprint is printed and pinned in the profile; later runs trust only that \
key (and a rotation the server announces with it). If the server presents \
another key, the chat refuses to connect: once the server's operator has \
confirmed the new fingerprint, run again with --accept-new-server-key (or \
delete the server_key line from the profile).")]
pub struct ChatArgs {
    /// The server's client address (host:port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub server: String,
    /// File holding this device's credentials (created by registering).
    #[arg(long, default_value = "./switchboard-chat.cred")]
    pub profile: PathBuf,
    /// Create a new account and save it to the profile (which must not exist).
    #[arg(long)]
    pub register: bool,
    /// Registration token, for servers whose registration policy is `token`.
    #[arg(long)]
    pub token: Option<String>,
    /// Link this new profile to an account with a code from `/link` on the
    /// account's primary device (the profile must not exist).
    #[arg(long, value_name = "CODE")]
    pub link: Option<String>,
    /// The name this device shows in the account's device list (with --link).
    #[arg(long, default_value = "chat")]
    pub device_name: String,
    /// Where files sent to this device are saved (never overwriting).
    #[arg(long, default_value = "./downloads")]
    pub downloads: PathBuf,
    /// Speak plaintext instead of Noise, for local development (the server
    /// accepts plaintext from loopback only). A profile registered over
    /// Noise cannot log in this way.
    #[arg(long)]
    pub plaintext: bool,
    /// Trust the key the server presents now in place of the one pinned in
    /// the profile, and pin it. Only after the server's operator has
    /// confirmed the new key's fingerprint: a changed key may also mean
    /// someone is intercepting the connection.
    #[arg(long)]
    pub accept_new_server_key: bool,
}

/// Runs the chat until `/quit` or end of input.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let server = resolve(&args.server)?;
    let (line_sender, line_receiver) =
        shared_channel::new_bounded::<String>(STDIN_LINES_QUEUED_MAX);
    // The stdin reader blocks in read_line, so it gets its own thread; a
    // tiny executor there owns the sending end of the channel. It is not
    // joined: at exit it may still be blocked in a read.
    let _stdin_reader = LocalExecutorBuilder::default()
        .name("chat-stdin")
        .spawn(move || async move {
            let sender = line_sender.connect().await;
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if sender.send(line.clone()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the stdin reader: {e}"))?;

    LocalExecutorBuilder::default()
        .name("chat")
        .spawn(move || async move {
            let lines = line_receiver.connect().await;
            let mut opts = ConnectOptions::new(server);
            opts.plaintext = args.plaintext;
            let mut out = std::io::stdout();
            let creds = log_in_or_register(&opts, &args, &mut out).await?;
            writeln!(
                out,
                "connecting to {server} as user {} device {} …",
                creds.user, creds.device
            )?;
            let mut profile = Profile::new(Some(args.profile.clone()), creds);
            let session = connect_profile(&opts, &args, &mut profile, &mut out).await?;
            writeln!(out, "connected. /help lists the commands.")?;
            let mut transfers = media::Transfers::new(args.downloads.clone());
            chat_loop(
                &session,
                &mut profile,
                || lines.recv(),
                &mut transfers,
                &mut out,
            )
            .await
            .map_err(|e| key_changed(e, &args))
        })
        .map_err(|e| anyhow::anyhow!("starting the chat executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("chat executor failed: {e}"))?
}

fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))
}

/// The profile file and the credentials last written to it. A session's
/// credentials change when the server's key is pinned or rotated, or when a
/// login binds the Noise key; [`Profile::sync`] then writes them.
pub(crate) struct Profile {
    /// `None`: nothing is written (tests).
    path: Option<PathBuf>,
    /// As written, except a pin dropped by `--accept-new-server-key`, which
    /// is written once a login has pinned the new key.
    saved: Credentials,
}

impl Profile {
    pub(crate) fn new(path: Option<PathBuf>, saved: Credentials) -> Profile {
        Profile { path, saved }
    }

    fn save(&mut self, credentials: Credentials) -> anyhow::Result<()> {
        if let Some(path) = &self.path {
            save_profile(&credentials, path)?;
        }
        self.saved = credentials;
        Ok(())
    }

    /// Saves the session's credentials if they changed, saying why.
    fn sync(&mut self, session: &ReconnectingSession, out: &mut dyn Write) -> anyhow::Result<()> {
        let now = session.credentials();
        if now == self.saved {
            return Ok(());
        }
        if let Some(note) = pin::pin_change(self.saved.server_key, now.server_key).note() {
            writeln!(out, "{note}")?;
        }
        if self.saved.binds_noise_key() && !now.binds_noise_key() {
            writeln!(
                out,
                "* the device's Noise key {} is bound: this profile now logs in with it alone",
                now.noise_keypair()
                    .map(|pair| pair.fingerprint())
                    .unwrap_or_default()
            )?;
        }
        self.save(now)
    }
}

/// Logs in with the profile's credentials: a profile from before Noise gets
/// a fresh Noise key to bind at this login (saved first, so a crash loses
/// nothing; not with `--plaintext`); `--accept-new-server-key` drops the
/// pin, so the key the server proves is pinned; a server key other than the
/// pin is refused with a warning that says how to accept it.
pub(crate) async fn connect_profile(
    opts: &ConnectOptions,
    args: &ChatArgs,
    profile: &mut Profile,
    out: &mut dyn Write,
) -> anyhow::Result<ReconnectingSession> {
    if !opts.plaintext && profile.saved.noise_private.is_none() {
        let upgraded = profile.saved.with_new_noise_key();
        profile.save(upgraded)?;
        writeln!(
            out,
            "* this profile logs in with a secret: binding a new Noise key to the device at this login"
        )?;
    }
    if args.accept_new_server_key {
        if let Some(old) = profile.saved.server_key.take() {
            writeln!(
                out,
                "* forgetting the pinned server key {}: trusting the key the server presents now",
                fingerprint(&old)
            )?;
        }
    }
    match ReconnectingSession::connect(opts, &profile.saved, ReconnectOptions::default()).await {
        Ok(session) => {
            profile.sync(&session, out)?;
            Ok(session)
        }
        Err(e) => Err(key_changed(
            anyhow::Error::new(e).context(format!("logging in to {}", opts.server)),
            args,
        )),
    }
}

/// A changed server key, anywhere in `error`, as the warning that says what
/// it may mean and how to accept the new key; any other error as it is.
fn key_changed(error: anyhow::Error, args: &ChatArgs) -> anyhow::Error {
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::ServerKeyChanged { expected, got }) => anyhow!(
            "{}",
            pin::key_changed_message(&args.server, &args.profile, expected, got)
        ),
        _ => error,
    }
}

/// Loads the profile, or registers and saves it when asked to or when it
/// does not exist yet.
async fn log_in_or_register(
    opts: &ConnectOptions,
    args: &ChatArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Credentials> {
    let exists = args.profile.exists();
    if exists && (args.register || args.link.is_some()) {
        anyhow::bail!(
            "{} already holds credentials; pick another --profile to register a new account",
            args.profile.display()
        );
    }
    if exists {
        return Credentials::load(&args.profile)
            .with_context(|| format!("reading {}", args.profile.display()));
    }
    if let Some(code) = &args.link {
        let creds = link(opts, code, &args.device_name)
            .await
            .with_context(|| format!("linking at {}", opts.server))?;
        save_profile(&creds, &args.profile)?;
        if let Some(note) = pin::pin_change(None, creds.server_key).note() {
            writeln!(out, "{note}")?;
        }
        writeln!(
            out,
            "linked: this is device {} of user {}; credentials saved to {}",
            creds.device,
            creds.user,
            args.profile.display()
        )?;
        return Ok(creds);
    }
    if !args.register {
        writeln!(
            out,
            "no profile at {}: registering a new account",
            args.profile.display()
        )?;
    }
    let creds = register(opts, args.token.as_deref())
        .await
        .with_context(|| format!("registering at {}", opts.server))?;
    save_profile(&creds, &args.profile)?;
    if let Some(note) = pin::pin_change(None, creds.server_key).note() {
        writeln!(out, "{note}")?;
    }
    writeln!(
        out,
        "registered: you are user {} (device {}); credentials saved to {}",
        creds.user,
        creds.device,
        args.profile.display()
    )?;
    Ok(creds)
}

fn save_profile(creds: &Credentials, path: &Path) -> anyhow::Result<()> {
    creds
        .save(path)
        .with_context(|| format!("saving credentials to {}", path.display()))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as u64
}

enum Input {
    Line(Option<String>),
    Event(Result<Event, ClientError>),
    Transfer(Option<media::Done>),
}

/// The chat proper: lines from `next_line` (None: end of input), events from
/// the session, everything printed to `out`; the profile is saved when a
/// reconnect changes the credentials (a rotated server key).
pub(crate) async fn chat_loop<F, Fut>(
    session: &ReconnectingSession,
    profile: &mut Profile,
    mut next_line: F,
    transfers: &mut media::Transfers,
    out: &mut dyn Write,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let mut outbox = Outbox::new(now_micros());
    let mut recipients = Recipients::default();
    let me = session.device();
    if me.1 != crate::ids::PRIMARY_DEVICE {
        // A companion's account always has its primary.
        recipients.learn(me.0, [crate::ids::PRIMARY_DEVICE, me.1]);
    }
    let mut peer: Option<UserId> = None;
    let mut reconnects = session.reconnects();
    loop {
        // Both branches are cancel safe: a line not taken stays in the
        // channel, a half-read frame stays in the session's buffer.
        let line = next_line();
        let input = futures_lite::future::or(
            futures_lite::future::or(async { Input::Line(line.await) }, async {
                Input::Event(session.next_event().await)
            }),
            async { Input::Transfer(transfers.next_done().await) },
        )
        .await;
        if session.reconnects() != reconnects {
            reconnects = session.reconnects();
            writeln!(out, "* reconnected; unsent messages are being resent")?;
            profile.sync(session, out)?;
        }
        match input {
            Input::Line(None) => break,
            Input::Line(Some(line)) => match parse_command(&line) {
                Command::Quit => break,
                Command::Help => writeln!(out, "{HELP}")?,
                Command::Nothing => {}
                Command::Invalid(why) => writeln!(out, "! {why}")?,
                Command::To(user) => {
                    peer = Some(user);
                    writeln!(out, "* talking to user {user}")?;
                }
                Command::Link => {
                    request(out, session.request_link_code())?;
                    session.flush().await?;
                }
                Command::Devices => {
                    request(out, session.list_devices())?;
                    session.flush().await?;
                }
                Command::Remove(device) => {
                    request(out, session.remove_device(device))?;
                    session.flush().await?;
                }
                Command::CreateGroup { name, members } => {
                    request(out, session.create_group(1, &name, &members))?;
                    session.flush().await?;
                }
                Command::GroupMessage { group, text } => {
                    let (id, _) = outbox.queue(UserId(0), &text);
                    outbox.addressed(id, 1);
                    match session.send_to_group(group, id, Bytes::from(text.clone().into_bytes())) {
                        Ok(()) => writeln!(out, "(group {group}) {text}")?,
                        Err(e) => writeln!(out, "! not sent: {e}")?,
                    }
                    session.flush().await?;
                }
                Command::SendFile(path) => {
                    let Some(to) = peer else {
                        writeln!(out, "! no peer: /to USER first")?;
                        continue;
                    };
                    transfers.send_file(session, to, &path, out).await?;
                }
                Command::Message { to, text } => {
                    let Some(to) = to.or(peer) else {
                        writeln!(out, "! no peer: /to USER first, or /msg USER text")?;
                        continue;
                    };
                    let (id, shown) = outbox.queue(to, &text);
                    recipients.sent(id, to, &text);
                    let devices = recipients.devices_of(to);
                    outbox.addressed(id, devices.len());
                    match send_text(session, to, id, &text, &devices) {
                        Ok(()) => writeln!(out, "{shown}")?,
                        Err(e) => writeln!(out, "! not sent: {e}")?,
                    }
                    copy_to_own_devices(session, &mut outbox, &mut recipients, me, to, &text, out)?;
                    session.flush().await?;
                }
            },
            Input::Event(Ok(event)) => {
                handle_event(session, &mut outbox, &mut recipients, transfers, event, out).await?
            }
            Input::Event(Err(e)) => return Err(e).context("the session ended"),
            Input::Transfer(Some(done)) => {
                transfer_done(session, &mut outbox, &mut recipients, done, out).await?
            }
            Input::Transfer(None) => {}
        }
        out.flush()?;
    }
    session.flush().await?;
    drain(session, &mut outbox, &mut recipients, transfers, out).await
}

/// Before leaving, waits (a bounded time) for the server to store what was
/// sent, so `echo "/msg 2 hi" | switchboard chat` delivers its message.
async fn drain(
    session: &ReconnectingSession,
    outbox: &mut Outbox,
    recipients: &mut Recipients,
    transfers: &mut media::Transfers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        // Files still moving get longer than messages.
        let limit = if transfers.pending() > 0 {
            EXIT_TRANSFER_TIMEOUT
        } else {
            EXIT_DRAIN_TIMEOUT
        };
        if session.unacked_sends() == 0 && transfers.pending() == 0 {
            break;
        }
        let left = (started + limit).saturating_duration_since(std::time::Instant::now());
        let input = futures_lite::future::or(
            futures_lite::future::or(
                async { Some(Input::Event(session.next_event().await)) },
                async { Some(Input::Transfer(transfers.next_done().await)) },
            ),
            async {
                glommio::timer::sleep(left).await;
                None
            },
        )
        .await;
        match input {
            Some(Input::Event(Ok(event))) => {
                handle_event(session, outbox, recipients, transfers, event, out).await?
            }
            Some(Input::Event(Err(e))) => return Err(e).context("the session ended"),
            Some(Input::Transfer(Some(done))) => {
                transfer_done(session, outbox, recipients, done, out).await?
            }
            Some(Input::Transfer(None) | Input::Line(_)) => {}
            None => {
                writeln!(
                    out,
                    "! leaving with {} message(s) the server has not confirmed and {} file(s) not sent or fetched",
                    session.unacked_sends(),
                    transfers.pending()
                )?;
                break;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// One payload for a recipient with only its primary device, else the
/// same text to each device (this client does no end-to-end encryption, so
/// each device's payload is the plain text).
fn send_text(
    session: &ReconnectingSession,
    to: UserId,
    id: ClientMessageId,
    text: &str,
    devices: &[DeviceId],
) -> Result<(), ClientError> {
    if devices == [crate::ids::PRIMARY_DEVICE] {
        return session.send(to, id, Bytes::copy_from_slice(text.as_bytes()));
    }
    let parts = devices
        .iter()
        .map(|d| (*d, Bytes::copy_from_slice(text.as_bytes())))
        .collect();
    session.send_to_devices(to, id, parts)
}

/// A copy of a message sent to `to`, for this account's other devices that
/// the chat knows of (from /devices, a copy one of them sent, or the
/// server's DEVICE_MISMATCH answer to an earlier copy), so they show it.
fn copy_to_own_devices(
    session: &ReconnectingSession,
    outbox: &mut Outbox,
    recipients: &mut Recipients,
    me: (UserId, DeviceId),
    to: UserId,
    text: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let others: Vec<DeviceId> = recipients
        .devices_of(me.0)
        .into_iter()
        .filter(|d| *d != me.1)
        .collect();
    if others.is_empty() || to == me.0 {
        return Ok(());
    }
    let id = outbox.untracked_id();
    let copy = format!("(you → {to}) {text}");
    recipients.sent(id, me.0, &copy);
    if let Err(e) = send_text(session, me.0, id, &copy, &others) {
        writeln!(out, "! copy for your other devices not sent: {e}")?;
    }
    Ok(())
}

/// A transfer finished: an uploaded file is announced to its recipient.
async fn transfer_done(
    session: &ReconnectingSession,
    outbox: &mut Outbox,
    recipients: &mut Recipients,
    done: media::Done,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match done {
        media::Done::Uploaded { to, file } => {
            let text = String::from_utf8(file.to_payload()).expect("a FileRef is UTF-8");
            let (id, _) = outbox.queue(to, &format!("[file {}]", file.safe_name()));
            recipients.sent(id, to, &text);
            let devices = recipients.devices_of(to);
            outbox.addressed(id, devices.len());
            match send_text(session, to, id, &text, &devices) {
                Ok(()) => writeln!(out, "* sent {} to user {to}", file.safe_name())?,
                Err(e) => writeln!(out, "! not sent: {e}")?,
            }
            session.flush().await?;
        }
        media::Done::Saved(line) | media::Done::Failed(line) => writeln!(out, "{line}")?,
    }
    Ok(())
}

fn request(out: &mut dyn Write, queued: Result<(), ClientError>) -> anyhow::Result<()> {
    if let Err(e) = queued {
        writeln!(out, "! not sent: {e}")?;
    }
    Ok(())
}

async fn handle_event(
    session: &ReconnectingSession,
    outbox: &mut Outbox,
    recipients: &mut Recipients,
    transfers: &mut media::Transfers,
    event: Event,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match event {
        Event::Error(error) if error.code() == ErrorCode::DeviceMismatch => {
            match recipients.on_mismatch(&error) {
                Some((to, text, mut devices)) => {
                    let id = ClientMessageId(error.client_message_id);
                    let me = session.device();
                    if to == me.0 {
                        // A copy for our other devices: not for this one.
                        devices.retain(|d| *d != me.1);
                    } else {
                        writeln!(
                            out,
                            "* user {to} has {} devices; sending to each",
                            devices.len()
                        )?;
                    }
                    outbox.addressed(id, devices.len());
                    if let Err(e) = send_text(session, to, id, &text, &devices) {
                        writeln!(out, "! not sent: {e}")?;
                    }
                    session.flush().await?;
                }
                None => writeln!(out, "{}", outbox.on_error(&error))?,
            }
        }
        Event::ServerAck(ack) => {
            recipients.answered(ack.client_message_id);
            if let Some(line) = outbox.on_server_ack(&ack) {
                writeln!(out, "{line}")?;
            }
        }
        Event::Deliver(deliver) => {
            let (me, _) = session.device();
            if deliver.sender_user_id == me.0 {
                // A copy from another device of this account.
                recipients.learn(
                    session.device().0,
                    [DeviceId(deliver.sender_device_id)],
                );
            }
            match crate::client::media::FileRef::from_payload(&deliver.payload) {
                Some(file) => {
                    writeln!(
                        out,
                        "{}",
                        format_incoming(&pb::Deliver {
                            payload: Bytes::from(format!(
                                "[file {} ({} bytes); fetching]",
                                file.safe_name(),
                                file.size
                            )),
                            ..deliver.clone()
                        })
                    )?;
                    transfers
                        .fetch(session, file, deliver.sender_user_id, out)
                        .await?;
                }
                None => writeln!(out, "{}", format_incoming(&deliver))?,
            }
            // Shown, so stored and read: ack it and say it was read. While
            // disconnected these fail; the message is then redelivered and
            // acked again, but the read receipt is not repeated.
            let _ = session.ack(InboxSeq(deliver.sequence));
            // A group's change is no one's message: nothing to mark read.
            if deliver.group_event.is_none() {
                let _ = session.read_receipt(
                    UserId(deliver.sender_user_id),
                    DeviceId(deliver.sender_device_id),
                    &[ClientMessageId(deliver.client_message_id)],
                );
            }
            session.flush().await?;
        }
        Event::Receipt(receipt) => {
            for line in outbox.on_receipt(&receipt) {
                writeln!(out, "{line}")?;
            }
            let _ = session.ack(InboxSeq(receipt.sequence));
            session.flush().await?;
        }
        Event::Error(error) if transfers.owns(error.client_message_id) => {
            writeln!(out, "{}", transfers.refused(&error))?
        }
        Event::Error(error) => {
            recipients.answered(error.client_message_id);
            writeln!(out, "{}", outbox.on_error(&error))?
        }
        Event::LinkCode(code) => writeln!(
            out,
            "* link code {} (single use, until {} UTC): on the new device run\n  switchboard chat --link {} --profile NEW_PROFILE",
            code.code,
            state::clock(code.expires_at_ms),
            code.code
        )?,
        Event::DeviceList(list) => {
            recipients.set_devices(
                session.device().0,
                list.devices.iter().map(|d| DeviceId(d.device_id)).collect(),
            );
            writeln!(out, "* devices (list version {}):", list.version)?;
            for device in &list.devices {
                let name = if device.device_id == 1 {
                    "primary"
                } else {
                    device.name.as_str()
                };
                let seen = if device.last_seen_ms == 0 {
                    "never".to_string()
                } else {
                    state::clock(device.last_seen_ms)
                };
                writeln!(
                    out,
                    "  {} {name} (linked {}, last seen {seen})",
                    device.device_id,
                    state::clock(device.linked_at_ms)
                )?;
            }
        }
        Event::DeviceRemoved(removed) => {
            recipients.forget(session.device().0, DeviceId(removed.device_id));
            writeln!(
            out,
                "* device {} removed (list version {})",
                removed.device_id,
                removed.version
            )?
        }
        Event::GoAway(go_away) => match go_away.reason() {
            crate::proto::GoAwayReason::Replaced => writeln!(
                out,
                "* this device logged in elsewhere; this session is closed"
            )?,
            crate::proto::GoAwayReason::DeviceRemoved => writeln!(
                out,
                "* this device was removed from the account; its profile no longer works"
            )?,
            reason => writeln!(
                out,
                "* the server closed the session ({}); reconnecting",
                reason.short_name()
            )?,
        },
        Event::GroupInfo(info) => writeln!(
            out,
            "* group {} \"{}\": {} members (version {})",
            info.group_id,
            info.name,
            info.members.len(),
            info.version
        )?,
        Event::Typing(t) if t.state() == crate::proto::TypingState::Composing => {
            writeln!(out, "* user {} is typing", t.from_user_id)?
        }
        Event::Typing(_) => {}
        Event::PresenceUpdate(p) if p.online => writeln!(out, "* user {} is online", p.user_id)?,
        Event::PresenceUpdate(p) => writeln!(
            out,
            "* user {} is offline (last seen {})",
            p.user_id,
            if p.last_seen_ms == 0 {
                "hidden".to_string()
            } else {
                state::clock(p.last_seen_ms)
            }
        )?,
        Event::MediaGrant(grant) => {
            transfers.on_grant(grant);
        }
        Event::PrekeysStored(_)
        | Event::PrekeyBundle(_)
        | Event::PrekeysLow(_)
        | Event::Privacy(_)
        | Event::PushRegistered(_)
        | Event::Pong(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
