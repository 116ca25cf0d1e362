//! Opening a device from what an operator types: a path to a file or a
//! block device, or an RBD image in qemu's form
//! `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]`.

use std::path::Path;

use volback_connectors::local::{create_sparse_file, DirectIo, LocalDevice, LocalOptions};
use volback_connectors::rbd::{Rados, RbdDevice, RbdSpec, RBD_FEATURE_LAYERING};
use volback_connectors::{BlockDevice, DeviceError};

pub struct Opened {
    pub device: Box<dyn BlockDevice>,
    /// volback created it just now (so it reads as zero).
    pub created: bool,
}

fn rbd_spec(spec: &str) -> Result<RbdSpec, DeviceError> {
    spec.parse()
        .map_err(|e: volback_connectors::rbd::SpecError| DeviceError::invalid(spec, e.to_string()))
}

pub fn open_source(
    spec: &str,
    queue_depth: usize,
    direct: DirectIo,
) -> Result<Opened, DeviceError> {
    if spec.starts_with("rbd:") {
        let device = RbdDevice::open(&rbd_spec(spec)?, false, queue_depth)?;
        return Ok(Opened {
            device: Box::new(device),
            created: false,
        });
    }
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

/// Opens the destination for writing; a path (or an RBD image) that does
/// not exist is created with `size` bytes, reading as zero.
pub fn open_destination(
    spec: &str,
    size: u64,
    queue_depth: usize,
    direct: DirectIo,
) -> Result<Opened, DeviceError> {
    if spec.starts_with("rbd:") {
        return open_rbd_destination(spec, size, queue_depth);
    }
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

fn open_rbd_destination(spec: &str, size: u64, queue_depth: usize) -> Result<Opened, DeviceError> {
    let parsed = rbd_spec(spec)?;
    match RbdDevice::open(&parsed, true, queue_depth) {
        Ok(d) => {
            return Ok(Opened {
                device: Box::new(d),
                created: false,
            })
        }
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound && parsed.snap.is_none() => {}
        Err(e) => return Err(e),
    }
    let name = parsed.to_string();
    let fail = |e: volback_connectors::rbd::RbdError| {
        DeviceError::new(
            volback_connectors::ErrorKind::Open,
            name.clone(),
            std::io::Error::other(e.to_string()),
        )
    };
    let ioctx = Rados::connect(&parsed.cluster)
        .map_err(fail)?
        .ioctx(&parsed.pool, parsed.namespace.as_deref())
        .map_err(fail)?;
    ioctx
        .create_image(&parsed.image, size, RBD_FEATURE_LAYERING)
        .map_err(fail)?;
    match RbdDevice::open(&parsed, true, queue_depth) {
        Ok(d) => Ok(Opened {
            device: Box::new(d),
            created: true,
        }),
        Err(e) => {
            let _ = ioctx.remove_image(&parsed.image);
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
        "rbd" => {
            let spec = RbdSpec::from_properties(&conn.properties)
                .map_err(|e| DeviceError::invalid("rbd connector", e.to_string()))?;
            Ok(Box::new(RbdDevice::open(
                &spec,
                writable && !conn.read_only,
                queue_depth,
            )?))
        }
        other => Err(DeviceError::invalid(
            other,
            format!("no connector named '{other}' (known: local, rbd)"),
        )),
    }
}
