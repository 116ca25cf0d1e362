//! Opening a device from what an operator types: for now a path to a file
//! or a block device (the iSCSI and RBD URL forms join here).

use std::path::Path;

use volback_connectors::local::{create_sparse_file, DirectIo, LocalDevice, LocalOptions};
use volback_connectors::{BlockDevice, DeviceError};

pub struct Opened {
    pub device: Box<dyn BlockDevice>,
    /// volback created it just now (so it reads as zero).
    pub created: bool,
}

pub fn open_source(
    spec: &str,
    queue_depth: usize,
    direct: DirectIo,
) -> Result<Opened, DeviceError> {
    let opts = LocalOptions {
        writable: false,
        direct,
        queue_depth,
    };
    Ok(Opened {
        device: Box::new(LocalDevice::open(Path::new(spec), &opts)?),
        created: false,
    })
}

/// Opens the destination for writing; a path that does not exist becomes a
/// new sparse file of `size` bytes.
pub fn open_destination(
    spec: &str,
    size: u64,
    queue_depth: usize,
    direct: DirectIo,
) -> Result<Opened, DeviceError> {
    let path = Path::new(spec);
    let created = !path.exists();
    if created {
        create_sparse_file(path, size)?;
    }
    let opts = LocalOptions {
        writable: true,
        direct,
        queue_depth,
    };
    match LocalDevice::open(path, &opts) {
        Ok(d) => Ok(Opened {
            device: Box::new(d),
            created,
        }),
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// Attaches what a driver exported, through the connector it names.
pub fn attach(
    conn: &volback_drivers::ConnectionInfo,
    writable: bool,
    queue_depth: usize,
) -> Result<Box<dyn BlockDevice>, DeviceError> {
    match conn.connector.as_str() {
        "local" => {
            let path = conn.properties.get("path").ok_or_else(|| {
                DeviceError::invalid("local connector", "connection info has no 'path' property")
            })?;
            let opts = LocalOptions {
                writable: writable && !conn.read_only,
                direct: DirectIo::Auto,
                queue_depth,
            };
            Ok(Box::new(LocalDevice::open(Path::new(path), &opts)?))
        }
        other => Err(DeviceError::invalid(
            other,
            format!("no connector named '{other}' (known: local)"),
        )),
    }
}
