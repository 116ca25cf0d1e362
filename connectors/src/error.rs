use std::fmt;
use std::io;

/// What went wrong, independent of which device it happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device could not be opened or inspected.
    Open,
    Read,
    Write,
    WriteZeroes,
    Flush,
    /// Querying the allocation map failed.
    AllocationMap,
    /// The device went away under us (ENXIO, ENODEV, ESHUTDOWN...).
    Vanished,
    /// The device does not support the operation (e.g. write-zeroes on tmpfs).
    Unsupported,
    /// The caller asked for something impossible (past the end, misaligned, queue full).
    InvalidRequest,
}

impl ErrorKind {
    fn verb(self) -> &'static str {
        match self {
            ErrorKind::Open => "open",
            ErrorKind::Read => "read",
            ErrorKind::Write => "write",
            ErrorKind::WriteZeroes => "write-zeroes",
            ErrorKind::Flush => "flush",
            ErrorKind::AllocationMap => "allocation map query",
            ErrorKind::Vanished => "I/O (device vanished)",
            ErrorKind::Unsupported => "unsupported operation",
            ErrorKind::InvalidRequest => "invalid request",
        }
    }
}

/// One error type for every connector: a kind, the device it happened on,
/// where on the device, and the underlying cause.
#[derive(Debug, thiserror::Error)]
pub struct DeviceError {
    pub kind: ErrorKind,
    /// Human name of the device (path, or a URL with any secret removed).
    pub device: String,
    /// Byte offset and length of the failed request, when there was one.
    pub offset: Option<u64>,
    pub len: Option<u64>,
    #[source]
    pub source: io::Error,
}

impl DeviceError {
    pub fn new(kind: ErrorKind, device: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind,
            device: device.into(),
            offset: None,
            len: None,
            source,
        }
    }

    pub fn at(mut self, offset: u64, len: u64) -> Self {
        self.offset = Some(offset);
        self.len = Some(len);
        self
    }

    /// Builds the error for an errno returned by an I/O request, turning the
    /// errnos that mean "the device is gone" into [`ErrorKind::Vanished`] and
    /// "not supported" into [`ErrorKind::Unsupported`].
    pub fn from_errno(kind: ErrorKind, device: &str, errno: i32) -> Self {
        let kind = match errno {
            libc::ENXIO | libc::ENODEV | libc::ESHUTDOWN | libc::ENOMEDIUM => ErrorKind::Vanished,
            libc::EOPNOTSUPP | libc::ENOTTY => ErrorKind::Unsupported,
            _ => kind,
        };
        Self::new(kind, device, io::Error::from_raw_os_error(errno))
    }

    pub fn invalid(device: &str, msg: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::InvalidRequest,
            device,
            io::Error::new(io::ErrorKind::InvalidInput, msg.into()),
        )
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.kind.verb(), self.device)?;
        if let Some(off) = self.offset {
            write!(f, " at offset {off}")?;
            if let Some(len) = self.len {
                write!(f, " (length {len})")?;
            }
        }
        write!(f, ": {}", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_device_and_offset() {
        let e = DeviceError::from_errno(ErrorKind::Write, "/dev/loop7", libc::EIO).at(4096, 512);
        let s = e.to_string();
        assert!(
            s.contains("write on /dev/loop7 at offset 4096 (length 512)"),
            "{s}"
        );
        let gone = DeviceError::from_errno(ErrorKind::Read, "/dev/loop7", libc::ENXIO);
        assert_eq!(gone.kind, ErrorKind::Vanished);
    }
}
