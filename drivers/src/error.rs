use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverErrorKind {
    NotFound,
    AlreadyExists,
    /// The size does not fit the pool, or the pool is full.
    NoSpace,
    InvalidArgument,
    /// In use (attached, mounted) where that is not allowed.
    Busy,
    Unsupported,
    Io,
}

/// A driver error: what kind, on which backend and object, and why.
#[derive(Debug, thiserror::Error)]
pub struct DriverError {
    pub kind: DriverErrorKind,
    /// The driver kind and pool, e.g. "file pool 'gold'".
    pub backend: String,
    /// The object concerned, e.g. "volume 3f2a…".
    pub object: String,
    pub message: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl DriverError {
    pub fn new(
        kind: DriverErrorKind,
        backend: impl Into<String>,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            backend: backend.into(),
            object: object.into(),
            message: message.into(),
            source: None,
        }
    }

    pub fn io(
        backend: impl Into<String>,
        object: impl Into<String>,
        message: impl Into<String>,
        e: std::io::Error,
    ) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => DriverErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => DriverErrorKind::AlreadyExists,
            _ => DriverErrorKind::Io,
        };
        Self {
            kind,
            backend: backend.into(),
            object: object.into(),
            message: message.into(),
            source: Some(e),
        }
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.backend, self.object, self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}
