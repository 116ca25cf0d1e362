//! Opening a device from what an operator types: a path to a file or a
//! block device, an RBD image in qemu's form
//! `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]`, or an
//! iSCSI LUN in libiscsi's form `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN`.

use std::path::Path;

use volback_connectors::iscsi::{Chap, IscsiDevice, IscsiSpec, SpecError};
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

fn iscsi_spec(spec: &str) -> Result<IscsiSpec, DeviceError> {
    // The error names the part that is wrong, never the spec (a password).
    spec.parse()
        .map_err(|e: SpecError| DeviceError::invalid("iscsi:// device", e.to_string()))
}

/// `spec` as output may show it: an `iscsi://` URL without its passwords
/// (and its query), anything else as typed (RBD specs refuse inline keys).
pub fn shown(spec: &str) -> String {
    if spec.starts_with("iscsi://") {
        iscsi_spec(spec).map_or_else(|e| e.device, |s| s.name())
    } else {
        spec.to_string()
    }
}

pub fn open_source(
    spec: &str,
    queue_depth: usize,
    direct: DirectIo,
) -> Result<Opened, DeviceError> {
    if spec.starts_with("iscsi://") {
        let device = IscsiDevice::open(&iscsi_spec(spec)?, false, queue_depth)?;
        return Ok(Opened {
            device: Box::new(device),
            created: false,
        });
    }
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
    if spec.starts_with("iscsi://") {
        // A LUN exists as big as it is: nothing to create.
        let device = IscsiDevice::open(&iscsi_spec(spec)?, true, queue_depth)?;
        return Ok(Opened {
            device: Box::new(device),
            created: false,
        });
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
        "iscsi" => {
            let spec = iscsi_connection_spec(conn)?;
            Ok(Box::new(IscsiDevice::open(
                &spec,
                writable && !conn.read_only,
                queue_depth,
            )?))
        }
        other => Err(DeviceError::invalid(
            other,
            format!("no connector named '{other}' (known: local, rbd, iscsi)"),
        )),
    }
}

/// The LUN an `iscsi` connection info names: properties `portal`
/// (HOST:PORT), `iqn`, `lun`, and for CHAP `chap_user` with
/// `chap_secret_file`, for mutual CHAP also `mutual_user` with
/// `mutual_secret_file` (secrets stay in their files until login).
fn iscsi_connection_spec(conn: &volback_drivers::ConnectionInfo) -> Result<IscsiSpec, DeviceError> {
    let bad = |m: String| DeviceError::invalid("iscsi connector", m);
    let prop = |k: &str| conn.properties.get(k).filter(|v| !v.is_empty());
    let required =
        |k: &str| prop(k).ok_or_else(|| bad(format!("connection info has no '{k}' property")));
    let account = |user: &str, file: &str| -> Result<Option<Chap>, DeviceError> {
        match (prop(user), prop(file)) {
            (None, None) => Ok(None),
            (Some(u), Some(f)) => Chap::from_secret_file(u.as_str(), Path::new(f))
                .map(Some)
                .map_err(|e| bad(e.to_string())),
            _ => Err(bad(format!(
                "connection info has only one of '{user}' and '{file}'"
            ))),
        }
    };
    let lun = required("lun")?
        .parse()
        .map_err(|_| bad("property 'lun' is not a number".into()))?;
    IscsiSpec::from_parts(
        required("portal")?,
        required("iqn")?,
        lun,
        account("chap_user", "chap_secret_file")?,
        account("mutual_user", "mutual_secret_file")?,
    )
    .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn shown_specs_carry_no_secret() {
        let url =
            "iscsi://bob%hunter2@10.0.0.5:3261/iqn.x:y/1?target_user=t&target_password=sesame";
        let s = shown(url);
        assert_eq!(s, "iscsi://bob@10.0.0.5:3261/iqn.x:y/1");
        assert!(!shown("iscsi://bob%hunter2@h/iqn.x:y/zz").contains("hunter2"));
        assert_eq!(shown("/dev/loop3"), "/dev/loop3");
        assert_eq!(shown("rbd:vol/img:id=admin"), "rbd:vol/img:id=admin");
    }
}
