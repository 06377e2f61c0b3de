//! The chat's logic without I/O: parsing what the user typed, the state of
//! each sent message (✓ → ✓✓ → read) and the lines printed for events.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::client::error_code_name;
use crate::ids::{ClientMessageId, DeviceId, UserId, PRIMARY_DEVICE};
use crate::proto::{pb, ReceiptKind};

/// Sent messages remembered for their receipts; older ones are forgotten
/// (their receipts then print nothing).
pub const TRACKED_MESSAGES_MAX: usize = 4096;

/// What one input line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `/to USER`: set the peer.
    To(UserId),
    /// `/msg USER text`, or a plain line (to the current peer).
    Message {
        to: Option<UserId>,
        text: String,
    },
    /// `/link`: ask for a code to link a new device (primary only).
    Link,
    /// `/devices`: list this account's devices.
    Devices,
    /// `/remove DEVICE`: remove a companion (or this device itself).
    Remove(DeviceId),
    /// `/group NAME USER...`: create a group with these members.
    CreateGroup {
        name: String,
        members: Vec<UserId>,
    },
    /// `/g GROUP text`: send to a group.
    GroupMessage {
        group: u64,
        text: String,
    },
    /// `/send-file PATH`: send a file to the current peer.
    SendFile(std::path::PathBuf),
    Quit,
    Help,
    /// Whitespace only.
    Nothing,
    /// Unparseable; the string says why.
    Invalid(String),
}

pub const HELP: &str = "\
commands:
  /to USER         send plain lines to user id USER
  /msg USER text   send one message to USER
  /link            get a code to link a new device (on the primary);
                   then run `switchboard chat --link CODE --profile NEW`
  /devices         list this account's devices
  /remove DEVICE   remove a linked device (a companion: only itself)
  /group NAME USER...  create a group with these users (you are its admin)
  /g GROUP text    send one message to group GROUP (its id, as printed)
  /send-file PATH  send a file to the current peer (encrypted, through the
                   media service); files sent to you are saved under
                   --downloads
  /help            this text
  /quit            leave
a plain line goes to the current peer.
sent messages show: ✓ sent (stored by the server), ✓✓ delivered (to every
device of the recipient), read";

fn parse_user(word: &str) -> Result<UserId, String> {
    match word.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("not a user id: {word:?} (a positive number)")),
        Ok(id) => Ok(UserId(id)),
    }
}

pub fn parse_command(line: &str) -> Command {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Command::Nothing;
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Command::Message {
            to: None,
            text: line.to_string(),
        };
    };
    let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let args = args.trim_start();
    match name {
        "quit" | "q" => Command::Quit,
        "help" | "h" | "?" => Command::Help,
        "to" => match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [user] => parse_user(user).map_or_else(Command::Invalid, Command::To),
            _ => Command::Invalid("usage: /to USER".to_string()),
        },
        "msg" | "m" => {
            let (user, text) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            if user.is_empty() || text.trim().is_empty() {
                return Command::Invalid("usage: /msg USER text".to_string());
            }
            match parse_user(user) {
                Ok(to) => Command::Message {
                    to: Some(to),
                    text: text.trim_start().to_string(),
                },
                Err(why) => Command::Invalid(why),
            }
        }
        "group" => {
            let mut words = args.split_whitespace();
            let name = words.next().unwrap_or_default().to_string();
            let members: Result<Vec<UserId>, String> = words.map(parse_user).collect();
            match members {
                Ok(members) if !name.is_empty() => Command::CreateGroup { name, members },
                Ok(_) => Command::Invalid("usage: /group NAME USER...".to_string()),
                Err(why) => Command::Invalid(why),
            }
        }
        "g" => {
            let (group, text) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            match group.parse::<u64>() {
                Ok(group) if group != 0 && !text.trim().is_empty() => Command::GroupMessage {
                    group,
                    text: text.trim_start().to_string(),
                },
                _ => Command::Invalid("usage: /g GROUP text".to_string()),
            }
        }
        "send-file" => match args.trim() {
            "" => Command::Invalid("usage: /send-file PATH".to_string()),
            path => Command::SendFile(path.into()),
        },
        "link" => Command::Link,
        "devices" => Command::Devices,
        "remove" => match args.trim().parse::<u32>() {
            Ok(device) if device > 0 => Command::Remove(DeviceId(device)),
            _ => Command::Invalid("usage: /remove DEVICE (a device id from /devices)".to_string()),
        },
        other => Command::Invalid(format!("unknown command /{other}; /help lists them")),
    }
}

/// Where a sent message stands. Ordered: a state only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MessageState {
    Queued,
    /// ✓: the server stored it.
    Sent,
    /// ✓✓: the recipient's device acknowledged it.
    Delivered,
    Read,
}

impl MessageState {
    pub fn label(self) -> &'static str {
        match self {
            MessageState::Queued => "… sending",
            MessageState::Sent => "✓ sent",
            MessageState::Delivered => "✓✓ delivered",
            MessageState::Read => "✓✓ read",
        }
    }
}

#[derive(Clone, Debug)]
struct Tracked {
    /// The number shown to the user (#1, #2, …).
    number: u64,
    to: UserId,
    state: MessageState,
    /// Devices the message was addressed to, and those that sent a
    /// delivered receipt: ✓✓ once every one has.
    devices: u32,
    delivered_by: Vec<u32>,
}

/// The sent messages and their states, keyed by client message id.
pub struct Outbox {
    /// The next client message id. Ids must be unique per device across
    /// runs (the server dedupes on them), so they start at the clock in
    /// microseconds instead of at 1.
    next_id: u64,
    next_number: u64,
    messages: BTreeMap<u64, Tracked>,
}

impl Outbox {
    /// `first_id`: a value above every id this device used before, e.g. the
    /// current time in microseconds.
    pub fn new(first_id: u64) -> Outbox {
        Outbox {
            next_id: first_id.max(1),
            next_number: 1,
            messages: BTreeMap::new(),
        }
    }

    /// A fresh client message id for a Send the outbox does not track (a
    /// copy for this account's other devices).
    pub fn untracked_id(&mut self) -> ClientMessageId {
        self.next_id += 1;
        ClientMessageId(self.next_id - 1)
    }

    /// Allocates an id for a new message to `to`; returns it and the line to print.
    pub fn queue(&mut self, to: UserId, text: &str) -> (ClientMessageId, String) {
        let id = self.next_id;
        self.next_id += 1;
        let number = self.next_number;
        self.next_number += 1;
        if self.messages.len() >= TRACKED_MESSAGES_MAX {
            self.messages.pop_first();
        }
        self.messages.insert(
            id,
            Tracked {
                number,
                to,
                state: MessageState::Queued,
                devices: 1,
                delivered_by: Vec::new(),
            },
        );
        (ClientMessageId(id), format!("[#{number} → {to}] {text}"))
    }

    pub fn state(&self, id: ClientMessageId) -> Option<MessageState> {
        self.messages.get(&id.0).map(|m| m.state)
    }

    /// Moves `id` forward to `state`; the line to print if it moved.
    fn advance(&mut self, id: u64, state: MessageState, detail: &str) -> Option<String> {
        let message = self.messages.get_mut(&id)?;
        if state <= message.state {
            return None;
        }
        message.state = state;
        Some(format!(
            "[#{} → {}] {}{detail}",
            message.number,
            message.to,
            state.label()
        ))
    }

    /// The message `id` went (again) to this many devices.
    pub fn addressed(&mut self, id: ClientMessageId, devices: usize) {
        if let Some(message) = self.messages.get_mut(&id.0) {
            message.devices = devices.max(1) as u32;
        }
    }

    pub fn on_server_ack(&mut self, ack: &pb::ServerAck) -> Option<String> {
        self.advance(ack.client_message_id, MessageState::Sent, "")
    }

    /// Lines for a receipt: one per covered message whose state moved.
    pub fn on_receipt(&mut self, receipt: &pb::Receipt) -> Vec<String> {
        let state = match receipt.kind() {
            ReceiptKind::Delivered => MessageState::Delivered,
            ReceiptKind::Read => MessageState::Read,
            ReceiptKind::Unspecified => return Vec::new(),
        };
        let mut lines = Vec::new();
        for id in &receipt.client_message_ids {
            if state == MessageState::Delivered {
                // ✓✓ when every device the message went to has it.
                let Some(message) = self.messages.get_mut(id) else {
                    continue;
                };
                if !message.delivered_by.contains(&receipt.by_device_id) {
                    message.delivered_by.push(receipt.by_device_id);
                }
                if (message.delivered_by.len() as u32) < message.devices {
                    continue;
                }
            }
            lines.extend(self.advance(*id, state, ""));
        }
        lines
    }

    /// The line for a server Error: tied to a message when it names one.
    pub fn on_error(&mut self, error: &pb::Error) -> String {
        let name = error_code_name(error.code);
        let fatal = if error.fatal {
            " (connection closed)"
        } else {
            ""
        };
        match self.messages.remove(&error.client_message_id) {
            Some(message) if error.client_message_id != 0 => format!(
                "[#{} → {}] ✗ not sent: {name}: {}",
                message.number, message.to, error.message
            ),
            _ => format!("! server error {name}: {}{fatal}", error.message),
        }
    }
}

/// The devices of the accounts written to, as the server's DEVICE_MISMATCH
/// answers taught them, and the text of each unanswered message (to send
/// it again, one payload per device, when the server asks for that).
#[derive(Default)]
pub struct Recipients {
    devices: HashMap<UserId, Vec<DeviceId>>,
    texts: BTreeMap<u64, (UserId, String)>,
}

impl Recipients {
    /// Learns that `user` has (at least) these devices.
    pub fn learn(&mut self, user: UserId, devices: impl IntoIterator<Item = DeviceId>) {
        let mut known = self.devices_of(user);
        known.extend(devices);
        known.sort();
        known.dedup();
        self.devices.insert(user, known);
    }

    /// Forgets a removed device of `user`.
    pub fn forget(&mut self, user: UserId, device: DeviceId) {
        if let Some(known) = self.devices.get_mut(&user) {
            known.retain(|d| *d != device);
        }
    }

    /// Replaces what is known of `user`'s devices (a device list).
    pub fn set_devices(&mut self, user: UserId, devices: Vec<DeviceId>) {
        self.devices.insert(user, devices);
    }

    /// The devices to address for `to` (the primary alone until the server
    /// says otherwise).
    pub fn devices_of(&self, to: UserId) -> Vec<DeviceId> {
        self.devices
            .get(&to)
            .cloned()
            .unwrap_or_else(|| vec![PRIMARY_DEVICE])
    }

    /// Remembers a sent message's text until the server answers it.
    pub fn sent(&mut self, id: ClientMessageId, to: UserId, text: &str) {
        if self.texts.len() >= TRACKED_MESSAGES_MAX {
            self.texts.pop_first();
        }
        self.texts.insert(id.0, (to, text.to_string()));
    }

    /// The server answered message `id` (ServerAck or a final Error).
    pub fn answered(&mut self, id: u64) {
        self.texts.remove(&id);
    }

    /// A DEVICE_MISMATCH for one of our messages: learns the recipient's
    /// devices; returns the message to send again, one payload per device,
    /// or None if it is not ours.
    pub fn on_mismatch(&mut self, error: &pb::Error) -> Option<(UserId, String, Vec<DeviceId>)> {
        let (to, text) = self.texts.get(&error.client_message_id)?.clone();
        let mut devices = self.devices_of(to);
        devices.retain(|d| !error.stale_devices.contains(&d.0));
        devices.extend(error.missing_devices.iter().map(|&d| DeviceId(d)));
        devices.sort();
        devices.dedup();
        self.devices.insert(to, devices.clone());
        Some((to, text, devices))
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(timestamp_ms: u64) -> String {
    let seconds = (timestamp_ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

/// The line for an incoming message: time, sender, text.
pub fn format_incoming(deliver: &pb::Deliver) -> String {
    let mut line = format!(
        "[{}] {}",
        clock(deliver.timestamp_ms),
        deliver.sender_user_id
    );
    if deliver.sender_device_id != 1 {
        let _ = write!(line, "/{}", deliver.sender_device_id);
    }
    if deliver.group_id != 0 {
        let _ = write!(line, " in group {}", deliver.group_id);
    }
    line.push_str(": ");
    if let Some(event) = &deliver.group_event {
        let users: Vec<String> = event.user_ids.iter().map(|u| u.to_string()).collect();
        let _ = match event.action() {
            pb::GroupAction::Create => {
                write!(line, "created \"{}\" with {}", event.name, users.join(", "))
            }
            pb::GroupAction::Rename => write!(line, "renamed it \"{}\"", event.name),
            action => write!(
                line,
                "{} {}",
                action
                    .as_str_name()
                    .trim_start_matches("GROUP_ACTION_")
                    .to_lowercase(),
                users.join(", ")
            ),
        };
        return line;
    }
    // The chat sends UTF-8 text; anything else is shown lossily.
    line.push_str(&String::from_utf8_lossy(&deliver.payload));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn device_receipt(kind: ReceiptKind, by_device: u32, id: ClientMessageId) -> pb::Receipt {
        pb::Receipt {
            sequence: 1,
            kind: kind as i32,
            by_user_id: 9,
            by_device_id: by_device,
            client_message_ids: vec![id.0],
            timestamp_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn delivered_shows_once_every_addressed_device_has_it() {
        let mut outbox = Outbox::new(100);
        let (id, _) = outbox.queue(UserId(9), "hi");
        outbox.addressed(id, 2);
        let delivered = |d| device_receipt(ReceiptKind::Delivered, d, id);
        assert!(outbox.on_receipt(&delivered(1)).is_empty());
        assert!(
            outbox.on_receipt(&delivered(1)).is_empty(),
            "a repeat counts once"
        );
        assert_eq!(outbox.state(id), Some(MessageState::Queued));
        let lines = outbox.on_receipt(&delivered(2));
        assert_eq!(lines, vec!["[#1 → 9] ✓✓ delivered".to_string()]);
        // Read on any device is read.
        let lines = outbox.on_receipt(&device_receipt(ReceiptKind::Read, 1, id));
        assert_eq!(lines, vec!["[#1 → 9] ✓✓ read".to_string()]);
    }

    #[test]
    fn a_mismatch_teaches_the_devices_and_gives_the_message_back() {
        let mut recipients = Recipients::default();
        let to = UserId(9);
        assert_eq!(recipients.devices_of(to), vec![PRIMARY_DEVICE]);
        recipients.sent(ClientMessageId(5), to, "hello");
        let error = pb::Error {
            code: crate::proto::ErrorCode::DeviceMismatch as i32,
            client_message_id: 5,
            missing_devices: vec![3, 2],
            ..Default::default()
        };
        let (back_to, text, devices) = recipients.on_mismatch(&error).unwrap();
        assert_eq!((back_to, text.as_str()), (to, "hello"));
        assert_eq!(devices, vec![DeviceId(1), DeviceId(2), DeviceId(3)]);
        // A device removed since: stale.
        let error = pb::Error {
            stale_devices: vec![2],
            missing_devices: vec![],
            ..error
        };
        let (_, _, devices) = recipients.on_mismatch(&error).unwrap();
        assert_eq!(devices, vec![DeviceId(1), DeviceId(3)]);
        recipients.answered(5);
        assert!(recipients.on_mismatch(&error).is_none());
        assert_eq!(parse_command("/remove 2"), Command::Remove(DeviceId(2)));
        assert!(matches!(parse_command("/remove x"), Command::Invalid(_)));
        assert_eq!(parse_command("/link"), Command::Link);
        assert_eq!(
            parse_command("/group climb 2 3"),
            Command::CreateGroup {
                name: "climb".into(),
                members: vec![UserId(2), UserId(3)]
            }
        );
        assert_eq!(
            parse_command("/g 77 hello all"),
            Command::GroupMessage {
                group: 77,
                text: "hello all".into()
            }
        );
        assert!(matches!(parse_command("/g x hi"), Command::Invalid(_)));
        let mut d = pb::Deliver {
            sender_user_id: 4,
            sender_device_id: 1,
            group_id: 77,
            payload: Bytes::from_static(b"hi all"),
            ..Default::default()
        };
        assert!(format_incoming(&d).ends_with("4 in group 77: hi all"));
        d.group_event = Some(pb::GroupEvent {
            action: pb::GroupAction::Remove as i32,
            user_ids: vec![5],
            name: String::new(),
        });
        assert!(
            format_incoming(&d).ends_with("4 in group 77: remove 5"),
            "{}",
            format_incoming(&d)
        );
        assert!(matches!(parse_command("/group"), Command::Invalid(_)));
        assert_eq!(parse_command("/devices"), Command::Devices);
    }

    #[test]
    fn parses_commands_and_plain_lines() {
        assert_eq!(parse_command("/to 12\n"), Command::To(UserId(12)));
        assert_eq!(
            parse_command("hello there"),
            Command::Message {
                to: None,
                text: "hello there".to_string()
            }
        );
        assert_eq!(
            parse_command("/msg 7  hi  you"),
            Command::Message {
                to: Some(UserId(7)),
                text: "hi  you".to_string()
            }
        );
        assert_eq!(parse_command("/quit"), Command::Quit);
        assert_eq!(parse_command("/help"), Command::Help);
        assert_eq!(parse_command("   "), Command::Nothing);
    }

    #[test]
    fn rejects_bad_commands_with_a_reason() {
        assert!(matches!(parse_command("/to"), Command::Invalid(_)));
        assert!(matches!(parse_command("/to 0"), Command::Invalid(_)));
        assert!(matches!(parse_command("/to bob"), Command::Invalid(_)));
        assert!(matches!(parse_command("/msg 5"), Command::Invalid(_)));
        assert!(matches!(parse_command("/dance"), Command::Invalid(w) if w.contains("/dance")));
    }

    fn receipt(kind: ReceiptKind, ids: Vec<u64>) -> pb::Receipt {
        pb::Receipt {
            sequence: 1,
            kind: kind as i32,
            by_user_id: 12,
            by_device_id: 1,
            client_message_ids: ids,
            timestamp_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn message_moves_from_sent_to_delivered_to_read() {
        let mut outbox = Outbox::new(1000);
        let (_, _) = outbox.queue(UserId(12), "one");
        let (_, _) = outbox.queue(UserId(12), "two");
        let (id, line) = outbox.queue(UserId(12), "three");
        assert_eq!(line, "[#3 → 12] three");
        assert_eq!(id, ClientMessageId(1002));
        assert_eq!(outbox.state(id), Some(MessageState::Queued));
        let ack = pb::ServerAck {
            client_message_id: id.0,
            server_sequence: 9,
            timestamp_ms: 0,
        };
        assert_eq!(
            outbox.on_server_ack(&ack).as_deref(),
            Some("[#3 → 12] ✓ sent")
        );
        assert_eq!(
            outbox.on_receipt(&receipt(ReceiptKind::Delivered, vec![id.0])),
            vec!["[#3 → 12] ✓✓ delivered".to_string()]
        );
        assert_eq!(
            outbox.on_receipt(&receipt(ReceiptKind::Read, vec![id.0])),
            vec!["[#3 → 12] ✓✓ read".to_string()]
        );
        assert_eq!(outbox.state(id), Some(MessageState::Read));
    }

    #[test]
    fn states_never_move_backwards() {
        let mut outbox = Outbox::new(1);
        let (id, _) = outbox.queue(UserId(5), "x");
        assert_eq!(
            outbox
                .on_receipt(&receipt(ReceiptKind::Read, vec![id.0]))
                .len(),
            1
        );
        // A late delivered receipt and a duplicate ServerAck change nothing.
        assert!(outbox
            .on_receipt(&receipt(ReceiptKind::Delivered, vec![id.0]))
            .is_empty());
        let ack = pb::ServerAck {
            client_message_id: id.0,
            server_sequence: 1,
            timestamp_ms: 0,
        };
        assert_eq!(outbox.on_server_ack(&ack), None);
        assert_eq!(outbox.state(id), Some(MessageState::Read));
    }

    #[test]
    fn one_receipt_covers_several_messages() {
        let mut outbox = Outbox::new(1);
        let (a, _) = outbox.queue(UserId(5), "a");
        let (b, _) = outbox.queue(UserId(5), "b");
        let lines = outbox.on_receipt(&receipt(ReceiptKind::Delivered, vec![a.0, b.0, 999]));
        assert_eq!(
            lines,
            vec!["[#1 → 5] ✓✓ delivered", "[#2 → 5] ✓✓ delivered"]
        );
    }

    #[test]
    fn error_for_a_send_names_the_message() {
        let mut outbox = Outbox::new(1);
        let (id, _) = outbox.queue(UserId(77), "x");
        let error = pb::Error {
            code: crate::proto::ErrorCode::UnknownRecipient as i32,
            message: "no such user".to_string(),
            client_message_id: id.0,
            fatal: false,
            retry_after_ms: 0,
            ..Default::default()
        };
        assert_eq!(
            outbox.on_error(&error),
            "[#1 → 77] ✗ not sent: UNKNOWN_RECIPIENT: no such user"
        );
        assert_eq!(outbox.state(id), None);
    }

    #[test]
    fn outbox_forgets_the_oldest_beyond_its_bound() {
        let mut outbox = Outbox::new(1);
        let (first, _) = outbox.queue(UserId(1), "x");
        for _ in 0..TRACKED_MESSAGES_MAX {
            outbox.queue(UserId(1), "x");
        }
        assert_eq!(outbox.state(first), None);
        assert_eq!(outbox.messages.len(), TRACKED_MESSAGES_MAX);
    }

    #[test]
    fn formats_incoming_with_time_and_sender() {
        let deliver = pb::Deliver {
            sequence: 4,
            sender_user_id: 13,
            sender_device_id: 1,
            client_message_id: 2,
            // 2023-11-14 22:13:20 UTC
            timestamp_ms: 1_700_000_000_000,
            payload: Bytes::from_static(b"hello"),
            ..Default::default()
        };
        assert_eq!(format_incoming(&deliver), "[22:13:20] 13: hello");
        let other_device = pb::Deliver {
            sender_device_id: 2,
            ..deliver
        };
        assert_eq!(format_incoming(&other_device), "[22:13:20] 13/2: hello");
    }
}
