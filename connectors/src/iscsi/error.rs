//! Typed iSCSI errors, and their mapping onto [`DeviceError`].

use std::io;
use std::sync::Arc;

use super::scsi::{self, Sense};
use super::text::NegotiationError;
use crate::{DeviceError, ErrorKind};

/// Something that went wrong talking iSCSI. No variant ever holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    /// The SCSI command completed with a status other than GOOD.
    #[error("SCSI command {opcode:#04x} failed: {}{}", scsi::status_name(*status), sense.map(|s| format!(", sense {s}")).unwrap_or_default())]
    Scsi {
        opcode: u8,
        status: u8,
        sense: Option<Sense>,
    },
    /// The target returned an iSCSI response code other than "completed".
    #[error("SCSI command {opcode:#04x} failed at the target (iSCSI response {response:#04x})")]
    TargetFailure { opcode: u8, response: u8 },
    /// Login status 0x0201: our CHAP credentials were refused.
    #[error("login failed: authentication failed (the target refused our CHAP credentials)")]
    AuthenticationFailed,
    /// Login status 0x0202: we may not access this target.
    #[error("login failed: authorization failure (initiator not allowed on this target)")]
    AuthorizationFailed,
    /// Login status 0x0203 (or 0x0205 for a bad LUN): no such target.
    #[error("login failed: target {0} not found")]
    TargetNotFound(String),
    /// Login status 0x0204: the target was removed.
    #[error("login failed: target {0} removed")]
    TargetRemoved(String),
    /// Mutual CHAP: the target could not prove it knows its secret.
    #[error("login failed: the target failed mutual CHAP authentication")]
    TargetAuthenticationFailed,
    /// The target moved (login status class 1) and we did not follow.
    #[error("login redirected to {0}")]
    Redirected(String),
    /// Any other login status.
    #[error("login failed with status {class:#04x}/{detail:#04x}: {}", login_status_text(*class, *detail))]
    Login { class: u8, detail: u8 },
    /// The operational parameters could not be agreed on.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
    /// The target broke the protocol.
    #[error("iSCSI protocol error: {0}")]
    Protocol(String),
    /// A digest did not match.
    #[error("{0} digest mismatch")]
    Digest(&'static str),
    /// The connection failed.
    #[error("iSCSI connection error: {0}")]
    Transport(#[from] io::Error),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Reconnecting failed every time: the target is gone. `last` is the
    /// last attempt's error.
    #[error("the target is unreachable after {attempts} reconnect attempt(s): {last}")]
    Unreachable {
        attempts: u32,
        #[source]
        last: Arc<IscsiError>,
    },
    /// The target let us log in again each time, but this command's
    /// connection failed on every try (a target that chokes on it, or
    /// breaks the protocol answering it). `last` is how it failed last.
    #[error(
        "the command failed its connection {tries} time(s), reissued after each re-login: {last}"
    )]
    CommandKeptFailing {
        tries: u32,
        #[source]
        last: Arc<IscsiError>,
    },
    /// The session was closed.
    #[error("the iSCSI session is closed")]
    Closed,
}

fn login_status_text(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (1, _) => "target moved",
        (2, 0) => "initiator error",
        (2, 1) => "authentication failure",
        (2, 2) => "authorization failure",
        (2, 3) => "target not found",
        (2, 4) => "target removed",
        (2, 5) => "unsupported version",
        (2, 6) => "too many connections",
        (2, 7) => "missing parameter",
        (2, 8) => "cannot include in session",
        (2, 9) => "session type not supported",
        (2, 10) => "session does not exist",
        (2, 11) => "invalid request during login",
        (3, 0) => "target error",
        (3, 1) => "service unavailable",
        (3, 2) => "out of resources",
        _ => "unknown status",
    }
}

impl IscsiError {
    /// Maps a login status (class, detail) to an error; `target` names it.
    pub fn from_login_status(class: u8, detail: u8, target: &str) -> Self {
        match (class, detail) {
            (2, 1) => IscsiError::AuthenticationFailed,
            (2, 2) => IscsiError::AuthorizationFailed,
            (2, 3) => IscsiError::TargetNotFound(target.into()),
            (2, 4) => IscsiError::TargetRemoved(target.into()),
            _ => IscsiError::Login { class, detail },
        }
    }

    /// Whether retrying (reconnecting) cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            IscsiError::AuthenticationFailed
                | IscsiError::AuthorizationFailed
                | IscsiError::TargetNotFound(_)
                | IscsiError::TargetRemoved(_)
                | IscsiError::TargetAuthenticationFailed
                | IscsiError::Negotiation(_)
                | IscsiError::Login { class: 2, .. }
        )
    }

    /// The device-level kind, given the operation's own kind.
    pub fn kind(&self, op: ErrorKind) -> ErrorKind {
        match self {
            IscsiError::TargetNotFound(_)
            | IscsiError::TargetRemoved(_)
            | IscsiError::Unreachable { .. } => ErrorKind::Vanished,
            IscsiError::Scsi { sense: Some(s), .. } if s.means_vanished() => ErrorKind::Vanished,
            IscsiError::Scsi { sense: Some(s), .. } if s.means_unsupported() => {
                ErrorKind::Unsupported
            }
            _ => op,
        }
    }

    /// The sense data of a failed SCSI command.
    pub fn sense(&self) -> Option<Sense> {
        match self {
            IscsiError::Scsi { sense, .. } => *sense,
            _ => None,
        }
    }

    /// Wraps this error for the device layer.
    pub fn into_device_error(self, op: ErrorKind, device: &str) -> DeviceError {
        let kind = self.kind(op);
        let io_kind = match &self {
            IscsiError::Transport(e) => e.kind(),
            IscsiError::Timeout(_) => io::ErrorKind::TimedOut,
            IscsiError::AuthenticationFailed
            | IscsiError::AuthorizationFailed
            | IscsiError::TargetAuthenticationFailed => io::ErrorKind::PermissionDenied,
            IscsiError::TargetNotFound(_) | IscsiError::TargetRemoved(_) => io::ErrorKind::NotFound,
            _ if kind == ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        DeviceError::new(kind, device, io::Error::new(io_kind, self))
    }
}

/// The [`IscsiError`] inside a device error, if there is one.
pub fn iscsi_cause(e: &DeviceError) -> Option<&IscsiError> {
    e.source.get_ref()?.downcast_ref::<IscsiError>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages() {
        let gone = IscsiError::Scsi {
            opcode: 0x88,
            status: 2,
            sense: Some(Sense {
                key: 5,
                asc: 0x25,
                ascq: 0,
            }),
        };
        assert_eq!(gone.kind(ErrorKind::Read), ErrorKind::Vanished);
        assert!(
            gone.to_string().contains("logical unit not supported"),
            "{gone}"
        );
        let d = gone.into_device_error(ErrorKind::Read, "iscsi://h:1/iqn.x:y/1");
        assert_eq!(d.kind, ErrorKind::Vanished);
        assert!(matches!(iscsi_cause(&d), Some(IscsiError::Scsi { .. })));
        let auth = IscsiError::from_login_status(2, 1, "iqn.x:y");
        assert!(matches!(auth, IscsiError::AuthenticationFailed));
        assert!(auth.is_permanent());
        let nf = IscsiError::from_login_status(2, 3, "iqn.x:y");
        assert_eq!(nf.kind(ErrorKind::Open), ErrorKind::Vanished);
        assert!(IscsiError::from_login_status(3, 1, "t")
            .to_string()
            .contains("service unavailable"));
        let unsup = IscsiError::Scsi {
            opcode: 0x93,
            status: 2,
            sense: Some(Sense {
                key: 5,
                asc: 0x20,
                ascq: 0,
            }),
        };
        assert_eq!(unsup.kind(ErrorKind::WriteZeroes), ErrorKind::Unsupported);
    }
}
