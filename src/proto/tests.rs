use super::*;

#[test]
fn round_trips_send() {
    let frame = Frame::Send(pb::Send {
        client_message_id: 7,
        recipient_user_id: 9,
        payload: Bytes::from_static(b"hello"),
        device_payloads: vec![],
    });
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    assert_eq!(buf.len(), frame.wire_len());
    assert_eq!(next_frame(&mut buf, 1024).unwrap(), Some(frame));
    assert!(buf.is_empty());
}

#[test]
fn rejects_oversized_frame_from_prefix_alone() {
    let mut buf = BytesMut::from(&[0u8, 0, 0x10, 0x01][..]);
    assert_eq!(
        next_frame(&mut buf, 1024),
        Err(DecodeError::FrameTooLarge {
            length: 0x1001,
            limit: 1024
        })
    );
}
