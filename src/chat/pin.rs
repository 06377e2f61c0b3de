//! The chat's trust in the server's Noise key, as SSH trusts a host key:
//! the key the server proves at first contact is pinned in the profile;
//! later runs connect with IK to it; a server that proves another key is
//! refused until the person accepts the new key; a rotation the server
//! announces (authenticated by the pinned key) moves the pin with a note.
//! The text only; the profile file and the session are in the parent module.

use std::path::Path;

use crate::noise::fingerprint;

/// What a login did to the pinned server key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinChange {
    /// The same key as pinned, or a plaintext session (no key).
    Unchanged,
    /// First contact: nothing was pinned; this key now is.
    Pinned([u8; 32]),
    /// The server announced its current key to a login made to the pinned
    /// (its previous) key; the announcement is authenticated by the pinned
    /// key, so the new key replaces it.
    Rotated { old: [u8; 32], new: [u8; 32] },
}

/// The change from the pin `pinned` to the key a session used, `used`
/// (`None` in plaintext). The client library returns a key other than the
/// pin only when the server announced a rotation: a key that merely differs
/// fails the login instead.
pub fn pin_change(pinned: Option<[u8; 32]>, used: Option<[u8; 32]>) -> PinChange {
    match (pinned, used) {
        (_, None) => PinChange::Unchanged,
        (None, Some(new)) => PinChange::Pinned(new),
        (Some(old), Some(new)) if old == new => PinChange::Unchanged,
        (Some(old), Some(new)) => PinChange::Rotated { old, new },
    }
}

impl PinChange {
    /// The line to print about the change, if any.
    pub fn note(&self) -> Option<String> {
        match self {
            PinChange::Unchanged => None,
            PinChange::Pinned(new) => Some(format!(
                "* the server's key fingerprint is {}; pinned in the profile (a server \
                 presenting another key will be refused)",
                fingerprint(new)
            )),
            PinChange::Rotated { old, new } => Some(format!(
                "* the server rotated its key: re-pinned {} (was {})",
                fingerprint(new),
                fingerprint(old)
            )),
        }
    }
}

/// The refusal printed when the server proves a key other than the pinned
/// one: what happened, what it may mean, and how to accept the new key.
pub fn key_changed_message(
    server: &str,
    profile: &Path,
    expected: &[u8; 32],
    got: &[u8; 32],
) -> String {
    format!(
        "\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: THE SERVER'S NOISE KEY HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
The server at {server} proved a key other than the one pinned in {profile}:
  pinned:    {expected}
  presented: {got}
Someone may be intercepting this connection (a man in the middle), or the
server's operator replaced its key. Nothing was sent after the server's
handshake message. If the operator confirms the new fingerprint, accept it:
  switchboard chat --profile {profile} --server {server} --accept-new-server-key
or delete the server_key line from {profile}.",
        profile = profile.display(),
        expected = fingerprint(expected),
        got = fingerprint(got),
    )
}
