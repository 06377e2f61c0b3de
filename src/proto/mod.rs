//! Wire protocol v1: framing and the frame types (sans-IO).
//!
//! A frame is `u32 length (big-endian) | u8 type | protobuf body`, where
//! `length` counts the type byte and the body. This module turns bytes into
//! [`Frame`]s and back; it does no I/O, allocates nothing while it waits for
//! more bytes, and checks a frame's length against the limit before anything
//! is reserved for it. Payload fields decode as `Bytes` slices of the input.
//!
//! Touched by: every shard's connection code and the client library, each on
//! its own thread; there is no shared state here.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The generated message types of `switchboard.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
}

pub use pb::{
    ErrorCode, GoAwayReason, GroupAction, LastSeenVisibility, MediaGrantKind, PushKind,
    ReceiptKind, TypingState,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes before the body: the length prefix and the type byte.
pub const HEADER_BYTES: usize = LENGTH_PREFIX_BYTES + 1;

/// The type byte of each frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Register = 0x01,
    Registered = 0x02,
    Hello = 0x03,
    Welcome = 0x04,
    Link = 0x05,
    Send = 0x10,
    ServerAck = 0x11,
    Deliver = 0x12,
    Ack = 0x13,
    Receipt = 0x14,
    ReadReceipt = 0x15,
    Ping = 0x20,
    Pong = 0x21,
    Error = 0x30,
    GoAway = 0x31,
    RequestLinkCode = 0x40,
    LinkCode = 0x41,
    ListDevices = 0x42,
    DeviceList = 0x43,
    RemoveDevice = 0x44,
    DeviceRemoved = 0x45,
    CreateGroup = 0x50,
    UpdateGroup = 0x51,
    GetGroup = 0x52,
    GroupInfo = 0x53,
    UploadPrekeys = 0x60,
    PrekeysStored = 0x61,
    FetchPrekeys = 0x62,
    PrekeyBundle = 0x63,
    PrekeysLow = 0x64,
    SendTyping = 0x70,
    Typing = 0x71,
    SubscribePresence = 0x72,
    PresenceUpdate = 0x73,
    SetPrivacy = 0x74,
    Privacy = 0x75,
    RegisterPush = 0x80,
    PushRegistered = 0x81,
    RequestMediaGrant = 0x90,
    MediaGrant = 0x91,
}

impl FrameType {
    pub const ALL: [FrameType; 40] = [
        FrameType::Register,
        FrameType::Registered,
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Send,
        FrameType::ServerAck,
        FrameType::Deliver,
        FrameType::Ack,
        FrameType::Receipt,
        FrameType::ReadReceipt,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Error,
        FrameType::GoAway,
        FrameType::Link,
        FrameType::RequestLinkCode,
        FrameType::LinkCode,
        FrameType::ListDevices,
        FrameType::DeviceList,
        FrameType::RemoveDevice,
        FrameType::DeviceRemoved,
        FrameType::CreateGroup,
        FrameType::UpdateGroup,
        FrameType::GetGroup,
        FrameType::GroupInfo,
        FrameType::UploadPrekeys,
        FrameType::PrekeysStored,
        FrameType::FetchPrekeys,
        FrameType::PrekeyBundle,
        FrameType::PrekeysLow,
        FrameType::SendTyping,
        FrameType::Typing,
        FrameType::SubscribePresence,
        FrameType::PresenceUpdate,
        FrameType::SetPrivacy,
        FrameType::Privacy,
        FrameType::RegisterPush,
        FrameType::PushRegistered,
        FrameType::RequestMediaGrant,
        FrameType::MediaGrant,
    ];

    pub fn from_byte(byte: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == byte)
    }

    /// A short lowercase name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Register => "register",
            FrameType::Registered => "registered",
            FrameType::Hello => "hello",
            FrameType::Welcome => "welcome",
            FrameType::Send => "send",
            FrameType::ServerAck => "server_ack",
            FrameType::Deliver => "deliver",
            FrameType::Ack => "ack",
            FrameType::Receipt => "receipt",
            FrameType::ReadReceipt => "read_receipt",
            FrameType::Ping => "ping",
            FrameType::Pong => "pong",
            FrameType::Error => "error",
            FrameType::GoAway => "go_away",
            FrameType::Link => "link",
            FrameType::RequestLinkCode => "request_link_code",
            FrameType::LinkCode => "link_code",
            FrameType::ListDevices => "list_devices",
            FrameType::DeviceList => "device_list",
            FrameType::RemoveDevice => "remove_device",
            FrameType::DeviceRemoved => "device_removed",
            FrameType::CreateGroup => "create_group",
            FrameType::UpdateGroup => "update_group",
            FrameType::GetGroup => "get_group",
            FrameType::GroupInfo => "group_info",
            FrameType::UploadPrekeys => "upload_prekeys",
            FrameType::PrekeysStored => "prekeys_stored",
            FrameType::FetchPrekeys => "fetch_prekeys",
            FrameType::PrekeyBundle => "prekey_bundle",
            FrameType::PrekeysLow => "prekeys_low",
            FrameType::SendTyping => "send_typing",
            FrameType::Typing => "typing",
            FrameType::SubscribePresence => "subscribe_presence",
            FrameType::PresenceUpdate => "presence_update",
            FrameType::SetPrivacy => "set_privacy",
            FrameType::Privacy => "privacy",
            FrameType::RegisterPush => "register_push",
            FrameType::PushRegistered => "push_registered",
            FrameType::RequestMediaGrant => "request_media_grant",
            FrameType::MediaGrant => "media_grant",
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Register(pb::Register),
    Registered(pb::Registered),
    Hello(pb::Hello),
    Welcome(pb::Welcome),
    Send(pb::Send),
    ServerAck(pb::ServerAck),
    Deliver(pb::Deliver),
    Ack(pb::Ack),
    Receipt(pb::Receipt),
    ReadReceipt(pb::ReadReceipt),
    Ping(pb::Ping),
    Pong(pb::Pong),
    Error(pb::Error),
    GoAway(pb::GoAway),
    Link(pb::Link),
    RequestLinkCode(pb::RequestLinkCode),
    LinkCode(pb::LinkCode),
    ListDevices(pb::ListDevices),
    DeviceList(pb::DeviceList),
    RemoveDevice(pb::RemoveDevice),
    DeviceRemoved(pb::DeviceRemoved),
    CreateGroup(pb::CreateGroup),
    UpdateGroup(pb::UpdateGroup),
    GetGroup(pb::GetGroup),
    GroupInfo(pb::GroupInfo),
    UploadPrekeys(pb::UploadPrekeys),
    PrekeysStored(pb::PrekeysStored),
    FetchPrekeys(pb::FetchPrekeys),
    PrekeyBundle(pb::PrekeyBundle),
    PrekeysLow(pb::PrekeysLow),
    SendTyping(pb::SendTyping),
    Typing(pb::Typing),
    SubscribePresence(pb::SubscribePresence),
    PresenceUpdate(pb::PresenceUpdate),
    SetPrivacy(pb::SetPrivacy),
    Privacy(pb::Privacy),
    RegisterPush(pb::RegisterPush),
    PushRegistered(pb::PushRegistered),
    RequestMediaGrant(pb::RequestMediaGrant),
    MediaGrant(pb::MediaGrant),
}

/// Why bytes from a peer are not a frame. Cheap to copy, never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {length} bytes exceeds the limit of {limit}")]
    FrameTooLarge { length: u32, limit: u32 },
    #[error("frame length 0: a frame has at least its type byte")]
    EmptyFrame,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {0:?} body")]
    Malformed(FrameType),
}

impl DecodeError {
    /// The error code a server answers this with (always fatal).
    pub fn code(self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::EmptyFrame | DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
        }
    }
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Register(_) => FrameType::Register,
            Frame::Registered(_) => FrameType::Registered,
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Send(_) => FrameType::Send,
            Frame::ServerAck(_) => FrameType::ServerAck,
            Frame::Deliver(_) => FrameType::Deliver,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Receipt(_) => FrameType::Receipt,
            Frame::ReadReceipt(_) => FrameType::ReadReceipt,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Error(_) => FrameType::Error,
            Frame::GoAway(_) => FrameType::GoAway,
            Frame::Link(_) => FrameType::Link,
            Frame::RequestLinkCode(_) => FrameType::RequestLinkCode,
            Frame::LinkCode(_) => FrameType::LinkCode,
            Frame::ListDevices(_) => FrameType::ListDevices,
            Frame::DeviceList(_) => FrameType::DeviceList,
            Frame::RemoveDevice(_) => FrameType::RemoveDevice,
            Frame::DeviceRemoved(_) => FrameType::DeviceRemoved,
            Frame::CreateGroup(_) => FrameType::CreateGroup,
            Frame::UpdateGroup(_) => FrameType::UpdateGroup,
            Frame::GetGroup(_) => FrameType::GetGroup,
            Frame::GroupInfo(_) => FrameType::GroupInfo,
            Frame::UploadPrekeys(_) => FrameType::UploadPrekeys,
            Frame::PrekeysStored(_) => FrameType::PrekeysStored,
            Frame::FetchPrekeys(_) => FrameType::FetchPrekeys,
            Frame::PrekeyBundle(_) => FrameType::PrekeyBundle,
            Frame::PrekeysLow(_) => FrameType::PrekeysLow,
            Frame::SendTyping(_) => FrameType::SendTyping,
            Frame::Typing(_) => FrameType::Typing,
            Frame::SubscribePresence(_) => FrameType::SubscribePresence,
            Frame::PresenceUpdate(_) => FrameType::PresenceUpdate,
            Frame::SetPrivacy(_) => FrameType::SetPrivacy,
            Frame::Privacy(_) => FrameType::Privacy,
            Frame::RegisterPush(_) => FrameType::RegisterPush,
            Frame::PushRegistered(_) => FrameType::PushRegistered,
            Frame::RequestMediaGrant(_) => FrameType::RequestMediaGrant,
            Frame::MediaGrant(_) => FrameType::MediaGrant,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Register(m) => m.encoded_len(),
            Frame::Registered(m) => m.encoded_len(),
            Frame::Hello(m) => m.encoded_len(),
            Frame::Welcome(m) => m.encoded_len(),
            Frame::Send(m) => m.encoded_len(),
            Frame::ServerAck(m) => m.encoded_len(),
            Frame::Deliver(m) => m.encoded_len(),
            Frame::Ack(m) => m.encoded_len(),
            Frame::Receipt(m) => m.encoded_len(),
            Frame::ReadReceipt(m) => m.encoded_len(),
            Frame::Ping(m) => m.encoded_len(),
            Frame::Pong(m) => m.encoded_len(),
            Frame::Error(m) => m.encoded_len(),
            Frame::GoAway(m) => m.encoded_len(),
            Frame::Link(m) => m.encoded_len(),
            Frame::RequestLinkCode(m) => m.encoded_len(),
            Frame::LinkCode(m) => m.encoded_len(),
            Frame::ListDevices(m) => m.encoded_len(),
            Frame::DeviceList(m) => m.encoded_len(),
            Frame::RemoveDevice(m) => m.encoded_len(),
            Frame::DeviceRemoved(m) => m.encoded_len(),
            Frame::CreateGroup(m) => m.encoded_len(),
            Frame::UpdateGroup(m) => m.encoded_len(),
            Frame::GetGroup(m) => m.encoded_len(),
            Frame::GroupInfo(m) => m.encoded_len(),
            Frame::UploadPrekeys(m) => m.encoded_len(),
            Frame::PrekeysStored(m) => m.encoded_len(),
            Frame::FetchPrekeys(m) => m.encoded_len(),
            Frame::PrekeyBundle(m) => m.encoded_len(),
            Frame::PrekeysLow(m) => m.encoded_len(),
            Frame::SendTyping(m) => m.encoded_len(),
            Frame::Typing(m) => m.encoded_len(),
            Frame::SubscribePresence(m) => m.encoded_len(),
            Frame::PresenceUpdate(m) => m.encoded_len(),
            Frame::SetPrivacy(m) => m.encoded_len(),
            Frame::Privacy(m) => m.encoded_len(),
            Frame::RegisterPush(m) => m.encoded_len(),
            Frame::PushRegistered(m) => m.encoded_len(),
            Frame::RequestMediaGrant(m) => m.encoded_len(),
            Frame::MediaGrant(m) => m.encoded_len(),
        }
    }

    /// Bytes this frame takes on the wire, prefix included.
    pub fn wire_len(&self) -> usize {
        HEADER_BYTES + self.body_len()
    }

    /// Appends the frame, prefix included, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let body_len = self.body_len();
        out.reserve(HEADER_BYTES + body_len);
        out.put_u32(1 + body_len as u32);
        out.put_u8(self.frame_type() as u8);
        // Encoding into a buffer with enough room cannot fail.
        let result = match self {
            Frame::Register(m) => m.encode(out),
            Frame::Registered(m) => m.encode(out),
            Frame::Hello(m) => m.encode(out),
            Frame::Welcome(m) => m.encode(out),
            Frame::Send(m) => m.encode(out),
            Frame::ServerAck(m) => m.encode(out),
            Frame::Deliver(m) => m.encode(out),
            Frame::Ack(m) => m.encode(out),
            Frame::Receipt(m) => m.encode(out),
            Frame::ReadReceipt(m) => m.encode(out),
            Frame::Ping(m) => m.encode(out),
            Frame::Pong(m) => m.encode(out),
            Frame::Error(m) => m.encode(out),
            Frame::GoAway(m) => m.encode(out),
            Frame::Link(m) => m.encode(out),
            Frame::RequestLinkCode(m) => m.encode(out),
            Frame::LinkCode(m) => m.encode(out),
            Frame::ListDevices(m) => m.encode(out),
            Frame::DeviceList(m) => m.encode(out),
            Frame::RemoveDevice(m) => m.encode(out),
            Frame::DeviceRemoved(m) => m.encode(out),
            Frame::CreateGroup(m) => m.encode(out),
            Frame::UpdateGroup(m) => m.encode(out),
            Frame::GetGroup(m) => m.encode(out),
            Frame::GroupInfo(m) => m.encode(out),
            Frame::UploadPrekeys(m) => m.encode(out),
            Frame::PrekeysStored(m) => m.encode(out),
            Frame::FetchPrekeys(m) => m.encode(out),
            Frame::PrekeyBundle(m) => m.encode(out),
            Frame::PrekeysLow(m) => m.encode(out),
            Frame::SendTyping(m) => m.encode(out),
            Frame::Typing(m) => m.encode(out),
            Frame::SubscribePresence(m) => m.encode(out),
            Frame::PresenceUpdate(m) => m.encode(out),
            Frame::SetPrivacy(m) => m.encode(out),
            Frame::Privacy(m) => m.encode(out),
            Frame::RegisterPush(m) => m.encode(out),
            Frame::PushRegistered(m) => m.encode(out),
            Frame::RequestMediaGrant(m) => m.encode(out),
            Frame::MediaGrant(m) => m.encode(out),
        };
        assert!(result.is_ok(), "buffer was reserved for the whole frame");
    }

    /// The frame as one owned buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.wire_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Decodes a body of the given type.
    pub fn decode(frame_type: FrameType, body: Bytes) -> Result<Frame, DecodeError> {
        let bad = |_| DecodeError::Malformed(frame_type);
        Ok(match frame_type {
            FrameType::Register => Frame::Register(pb::Register::decode(body).map_err(bad)?),
            FrameType::Registered => Frame::Registered(pb::Registered::decode(body).map_err(bad)?),
            FrameType::Hello => Frame::Hello(pb::Hello::decode(body).map_err(bad)?),
            FrameType::Welcome => Frame::Welcome(pb::Welcome::decode(body).map_err(bad)?),
            FrameType::Send => Frame::Send(pb::Send::decode(body).map_err(bad)?),
            FrameType::ServerAck => Frame::ServerAck(pb::ServerAck::decode(body).map_err(bad)?),
            FrameType::Deliver => Frame::Deliver(pb::Deliver::decode(body).map_err(bad)?),
            FrameType::Ack => Frame::Ack(pb::Ack::decode(body).map_err(bad)?),
            FrameType::Receipt => Frame::Receipt(pb::Receipt::decode(body).map_err(bad)?),
            FrameType::ReadReceipt => {
                Frame::ReadReceipt(pb::ReadReceipt::decode(body).map_err(bad)?)
            }
            FrameType::Ping => Frame::Ping(pb::Ping::decode(body).map_err(bad)?),
            FrameType::Pong => Frame::Pong(pb::Pong::decode(body).map_err(bad)?),
            FrameType::Error => Frame::Error(pb::Error::decode(body).map_err(bad)?),
            FrameType::GoAway => Frame::GoAway(pb::GoAway::decode(body).map_err(bad)?),
            FrameType::Link => Frame::Link(pb::Link::decode(body).map_err(bad)?),
            FrameType::RequestLinkCode => {
                Frame::RequestLinkCode(pb::RequestLinkCode::decode(body).map_err(bad)?)
            }
            FrameType::LinkCode => Frame::LinkCode(pb::LinkCode::decode(body).map_err(bad)?),
            FrameType::ListDevices => {
                Frame::ListDevices(pb::ListDevices::decode(body).map_err(bad)?)
            }
            FrameType::DeviceList => Frame::DeviceList(pb::DeviceList::decode(body).map_err(bad)?),
            FrameType::RemoveDevice => {
                Frame::RemoveDevice(pb::RemoveDevice::decode(body).map_err(bad)?)
            }
            FrameType::DeviceRemoved => {
                Frame::DeviceRemoved(pb::DeviceRemoved::decode(body).map_err(bad)?)
            }
            FrameType::CreateGroup => {
                Frame::CreateGroup(pb::CreateGroup::decode(body).map_err(bad)?)
            }
            FrameType::UpdateGroup => {
                Frame::UpdateGroup(pb::UpdateGroup::decode(body).map_err(bad)?)
            }
            FrameType::GetGroup => Frame::GetGroup(pb::GetGroup::decode(body).map_err(bad)?),
            FrameType::GroupInfo => Frame::GroupInfo(pb::GroupInfo::decode(body).map_err(bad)?),
            FrameType::UploadPrekeys => {
                Frame::UploadPrekeys(pb::UploadPrekeys::decode(body).map_err(bad)?)
            }
            FrameType::PrekeysStored => {
                Frame::PrekeysStored(pb::PrekeysStored::decode(body).map_err(bad)?)
            }
            FrameType::FetchPrekeys => {
                Frame::FetchPrekeys(pb::FetchPrekeys::decode(body).map_err(bad)?)
            }
            FrameType::PrekeyBundle => {
                Frame::PrekeyBundle(pb::PrekeyBundle::decode(body).map_err(bad)?)
            }
            FrameType::PrekeysLow => Frame::PrekeysLow(pb::PrekeysLow::decode(body).map_err(bad)?),
            FrameType::SendTyping => Frame::SendTyping(pb::SendTyping::decode(body).map_err(bad)?),
            FrameType::Typing => Frame::Typing(pb::Typing::decode(body).map_err(bad)?),
            FrameType::SubscribePresence => {
                Frame::SubscribePresence(pb::SubscribePresence::decode(body).map_err(bad)?)
            }
            FrameType::PresenceUpdate => {
                Frame::PresenceUpdate(pb::PresenceUpdate::decode(body).map_err(bad)?)
            }
            FrameType::SetPrivacy => Frame::SetPrivacy(pb::SetPrivacy::decode(body).map_err(bad)?),
            FrameType::Privacy => Frame::Privacy(pb::Privacy::decode(body).map_err(bad)?),
            FrameType::RegisterPush => {
                Frame::RegisterPush(pb::RegisterPush::decode(body).map_err(bad)?)
            }
            FrameType::PushRegistered => {
                Frame::PushRegistered(pb::PushRegistered::decode(body).map_err(bad)?)
            }
            FrameType::RequestMediaGrant => {
                Frame::RequestMediaGrant(pb::RequestMediaGrant::decode(body).map_err(bad)?)
            }
            FrameType::MediaGrant => Frame::MediaGrant(pb::MediaGrant::decode(body).map_err(bad)?),
        })
    }
}

/// Looks at the front of `buf` for one whole frame.
///
/// Returns `Ok(None)` when more bytes are needed (nothing is consumed), the
/// frame's type and body when one is complete (its bytes are consumed; the
/// body shares `buf`'s allocation), or an error as soon as the prefix shows a
/// bad length or type, before the body has arrived.
pub fn split_frame(
    buf: &mut BytesMut,
    frame_bytes_max: u32,
) -> Result<Option<(FrameType, Bytes)>, DecodeError> {
    if buf.len() < LENGTH_PREFIX_BYTES {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if length == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if length > frame_bytes_max {
        return Err(DecodeError::FrameTooLarge {
            length,
            limit: frame_bytes_max,
        });
    }
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let frame_type = FrameType::from_byte(buf[4]).ok_or(DecodeError::UnknownType(buf[4]))?;
    let total = LENGTH_PREFIX_BYTES + length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_BYTES);
    Ok(Some((frame_type, frame.freeze())))
}

/// `split_frame` followed by `Frame::decode`.
pub fn next_frame(buf: &mut BytesMut, frame_bytes_max: u32) -> Result<Option<Frame>, DecodeError> {
    match split_frame(buf, frame_bytes_max)? {
        None => Ok(None),
        Some((frame_type, body)) => Frame::decode(frame_type, body).map(Some),
    }
}

/// Bytes still needed before the frame at the front of `buf` is complete
/// (0 when a whole frame or an invalid prefix is there). Lets a reader size
/// its next read to the frame instead of guessing.
pub fn bytes_wanted(buf: &[u8]) -> usize {
    if buf.len() < LENGTH_PREFIX_BYTES {
        return HEADER_BYTES - buf.len();
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    (LENGTH_PREFIX_BYTES + length).saturating_sub(buf.len())
}

/// A non-fatal Error answering the request or Send with id `id` (carried
/// in `client_message_id`).
pub fn refusal(code: ErrorCode, message: &str, id: u64) -> Frame {
    Frame::Error(pb::Error {
        code: code as i32,
        message: message.to_string(),
        client_message_id: id,
        ..Default::default()
    })
}

/// An Error frame.
pub fn error_frame(code: ErrorCode, message: &str, fatal: bool) -> Frame {
    Frame::Error(pb::Error {
        code: code as i32,
        message: message.to_string(),
        client_message_id: 0,
        fatal,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
