//! Safe owners of librados / librbd handles.
//!
//! Each handle is freed on drop, and each one keeps what it was made from
//! alive (an image holds its I/O context, which holds the cluster
//! connection), so the C side never sees a handle used after its parent was
//! shut down. Errors carry the operation and what it was applied to (cluster
//! config, pool, image), never a key.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info};

use super::ffi::{self, Api};

/// How to reach a cluster and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// ceph.conf to read; `None` uses librados' search ($CEPH_CONF,
    /// /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
    pub conf: Option<PathBuf>,
    /// Client id without the "client." prefix; `None` means "admin".
    pub id: Option<String>,
    /// Keyring file; `None` uses whatever the conf says.
    pub keyring: Option<PathBuf>,
    /// Bound on connecting and on monitor requests (librados waits five
    /// minutes by default, far too long for an operator's command).
    pub connect_timeout: Duration,
    /// Bound on each OSD request; zero waits forever. Generous, because a
    /// cluster that is recovering may stall requests for a while.
    pub op_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            conf: None,
            id: None,
            keyring: None,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(120),
        }
    }
}

impl ClusterConfig {
    /// How errors and logs name the cluster.
    fn describe(&self) -> String {
        let conf = match &self.conf {
            Some(p) => p.display().to_string(),
            None => "default ceph.conf".to_string(),
        };
        format!(
            "cluster conf {conf}, client.{}",
            self.id.as_deref().unwrap_or("admin")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librados / librbd could not be loaded.
    #[error("{0}")]
    Library(String),
    /// A call into librados / librbd failed.
    #[error("{op} ({context}): {source}")]
    Call {
        op: &'static str,
        context: String,
        #[source]
        source: io::Error,
    },
    /// An argument librados would choke on (a NUL inside a name).
    #[error("{context}: {msg}")]
    Invalid { context: String, msg: String },
}

impl RbdError {
    /// The errno of a failed call, if it was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Turns librados' "negative errno or success" into a Result.
fn check(r: i64, op: &'static str, context: impl FnOnce() -> String) -> Result<i64, RbdError> {
    if r >= 0 {
        return Ok(r);
    }
    Err(RbdError::Call {
        op,
        context: context(),
        source: io::Error::from_raw_os_error(-r as i32),
    })
}

fn cstr(s: &str, context: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Invalid {
        context: context.to_string(),
        msg: format!("{s:?} contains a NUL byte"),
    })
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(ptr::null(), |c| c.as_ptr())
}

/// A connected cluster handle (`rados_t`).
pub struct Rados {
    api: &'static Api,
    handle: ffi::rados_t,
    desc: String,
}

// SAFETY: librados handles are thread-safe; we never hand out &mut access.
unsafe impl Send for Rados {}
unsafe impl Sync for Rados {}

impl Rados {
    /// Creates a handle, applies the config and timeouts, and connects.
    pub fn connect(cfg: &ClusterConfig) -> Result<Arc<Rados>, RbdError> {
        let api = ffi::api().map_err(RbdError::Library)?;
        let desc = cfg.describe();
        let id = cfg.id.as_deref().map(|s| cstr(s, &desc)).transpose()?;
        let mut handle = ptr::null_mut();
        // SAFETY: out-pointer to a local; id is NUL-terminated or NULL.
        let r = unsafe { (api.rados.rados_create)(&mut handle, opt_ptr(&id)) };
        check(r.into(), "rados_create", || desc.clone())?;
        // From here on, drop shuts the handle down, whether or not connected.
        let rados = Rados { api, handle, desc };
        let conf = cfg
            .conf
            .as_ref()
            .map(|p| cstr(&p.to_string_lossy(), &rados.desc))
            .transpose()?;
        // SAFETY: valid handle; path NUL-terminated or NULL (search path).
        let r = unsafe { (api.rados.rados_conf_read_file)(handle, opt_ptr(&conf)) };
        check(r.into(), "reading the ceph config", || rados.desc.clone())?;
        if let Some(k) = &cfg.keyring {
            rados.conf_set("keyring", &k.to_string_lossy())?;
        }
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        let connect = secs(cfg.connect_timeout).max(1).to_string();
        rados.conf_set("client_mount_timeout", &connect)?;
        rados.conf_set("rados_mon_op_timeout", &connect)?;
        rados.conf_set("rados_osd_op_timeout", &secs(cfg.op_timeout).to_string())?;
        // SAFETY: valid, configured handle.
        let r = unsafe { (api.rados.rados_connect)(handle) };
        check(r.into(), "connecting to the cluster", || {
            // librados' bare errnos are cryptic here; say what they mean.
            let hint = match -r {
                libc::ENOENT => ", no keyring found (pass keyring=PATH or set it in the conf)",
                libc::EACCES | libc::EPERM => ", authentication refused",
                libc::ETIMEDOUT => ", no monitor answered",
                _ => "",
            };
            format!("{}, timeout {connect} s{hint}", rados.desc)
        })?;
        info!(cluster = %rados.desc, "connected to ceph cluster");
        Ok(Arc::new(rados))
    }

    fn conf_set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let k = cstr(key, &self.desc)?;
        let v = cstr(value, &self.desc)?;
        // SAFETY: valid handle and strings.
        let r = unsafe { (self.api.rados.rados_conf_set)(self.handle, k.as_ptr(), v.as_ptr()) };
        // The value is a path or a number, never a secret: fine to show.
        check(r.into(), "setting a ceph option", || {
            format!("{}, {key} = {value}", self.desc)
        })?;
        Ok(())
    }

    /// The cluster's fsid (a UUID string).
    pub fn fsid(&self) -> Result<String, RbdError> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: buffer and its length.
        let r = unsafe { (self.api.rados.rados_cluster_fsid)(self.handle, buf.as_mut_ptr(), 64) };
        check(r.into(), "rados_cluster_fsid", || self.desc.clone())?;
        // SAFETY: librados NUL-terminates within the buffer.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Raw capacity and free space of the cluster, in bytes (librados has
    /// no per-pool free space: every pool draws on the same OSDs).
    pub fn capacity(&self) -> Result<(u64, u64), RbdError> {
        let mut st = ffi::rados_cluster_stat_t::default();
        // SAFETY: valid handle and a struct to fill.
        let r = unsafe { (self.api.rados.rados_cluster_stat)(self.handle, &mut st) };
        check(r.into(), "rados_cluster_stat", || self.desc.clone())?;
        Ok((st.kb * 1024, st.kb_avail * 1024))
    }

    /// The id of a pool by name.
    pub fn pool_id(&self, pool: &str) -> Result<i64, RbdError> {
        let c = cstr(pool, &self.desc)?;
        // SAFETY: valid handle and name.
        let r = unsafe { (self.api.rados.rados_pool_lookup)(self.handle, c.as_ptr()) };
        check(r, "rados_pool_lookup", || {
            format!("{}, pool {pool}", self.desc)
        })
    }

    /// An I/O context on `pool`, optionally restricted to a namespace.
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<IoCtx, RbdError> {
        let desc = match namespace {
            Some(ns) => format!("{}, pool {pool}/{ns}", self.desc),
            None => format!("{}, pool {pool}", self.desc),
        };
        let c = cstr(pool, &desc)?;
        let ns = namespace.map(|n| cstr(n, &desc)).transpose()?;
        let mut handle = ptr::null_mut();
        // SAFETY: valid handle, name, out-pointer.
        let r =
            unsafe { (self.api.rados.rados_ioctx_create)(self.handle, c.as_ptr(), &mut handle) };
        check(r.into(), "opening the pool", || desc.clone())?;
        if let Some(ns) = &ns {
            // SAFETY: fresh ioctx, NUL-terminated namespace.
            unsafe { (self.api.rados.rados_ioctx_set_namespace)(handle, ns.as_ptr()) };
        }
        Ok(IoCtx {
            rados: self.clone(),
            handle,
            desc,
        })
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: every IoCtx (and so every Image) holds an Arc to us, so
        // nothing uses the handle any more.
        unsafe { (self.api.rados.rados_shutdown)(self.handle) };
        debug!(cluster = %self.desc, "disconnected from ceph cluster");
    }
}

/// An I/O context on one pool (`rados_ioctx_t`): where images live.
pub struct IoCtx {
    rados: Arc<Rados>,
    handle: ffi::rados_ioctx_t,
    desc: String,
}

// SAFETY: I/O contexts are thread-safe for the operations we use.
unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

/// A snapshot as `rbd_snap_list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: String,
}

impl IoCtx {
    fn api(&self) -> &'static Api {
        self.rados.api
    }

    fn ctx(&self, image: &str) -> String {
        format!("{}, image {image}", self.desc)
    }

    /// Creates a format 2 image with the given feature bits (e.g.
    /// `RBD_FEATURE_LAYERING`, so snapshots can be cloned) and the default
    /// 4 MiB objects.
    pub fn create_image(&self, name: &str, size: u64, features: u64) -> Result<(), RbdError> {
        let c = cstr(name, &self.ctx(name))?;
        let mut order: c_int = 0;
        // SAFETY: valid ioctx, name and out-pointer.
        let r = unsafe {
            (self.api().rbd.rbd_create2)(self.handle, c.as_ptr(), size, features, &mut order)
        };
        check(r.into(), "rbd_create2", || self.ctx(name))?;
        info!(image = %self.ctx(name), size, features, "created rbd image");
        Ok(())
    }

    /// Removes an image (it must have no snapshots and not be open).
    pub fn remove_image(&self, name: &str) -> Result<(), RbdError> {
        let c = cstr(name, &self.ctx(name))?;
        // SAFETY: valid ioctx and name.
        let r = unsafe { (self.api().rbd.rbd_remove)(self.handle, c.as_ptr()) };
        check(r.into(), "rbd_remove", || self.ctx(name))?;
        info!(image = %self.ctx(name), "removed rbd image");
        Ok(())
    }

    /// Names of the images in the pool (namespace).
    pub fn list_images(&self) -> Result<Vec<String>, RbdError> {
        let mut max = 64usize;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(max);
            // SAFETY: room for `max` entries; librbd fills at most that many.
            let r =
                unsafe { (self.api().rbd.rbd_list2)(self.handle, specs.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue; // max now holds the count needed
            }
            check(r.into(), "rbd_list2", || self.desc.clone())?;
            // SAFETY: librbd initialised the first `max` entries.
            unsafe { specs.set_len(max) };
            let names = specs
                .iter()
                // SAFETY: each name is a NUL-terminated string librbd allocated.
                .map(|s| {
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings of exactly the entries filled in.
            unsafe { (self.api().rbd.rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), max) };
            return Ok(names);
        }
    }

    /// Clones `parent@snap` (in this pool) to `child` in `dest`'s pool. With
    /// clone format 1 (the default while the cluster allows pre-mimic
    /// clients) the snapshot must be protected first.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        dest: &IoCtx,
        child: &str,
        features: u64,
    ) -> Result<(), RbdError> {
        let ctx = || format!("{}@{snap} -> {}", self.ctx(parent), dest.ctx(child));
        let (p, s, c) = (
            cstr(parent, &ctx())?,
            cstr(snap, &ctx())?,
            cstr(child, &ctx())?,
        );
        let mut order: c_int = 0;
        // SAFETY: valid ioctxs, names and out-pointer.
        let r = unsafe {
            (self.api().rbd.rbd_clone)(
                self.handle,
                p.as_ptr(),
                s.as_ptr(),
                dest.handle,
                c.as_ptr(),
                features,
                &mut order,
            )
        };
        check(r.into(), "rbd_clone", ctx)?;
        Ok(())
    }

    /// Opens an image, at a snapshot if `snap` is given. A read-only open
    /// takes no watch or lock on the image (librbd then answers writes
    /// with EROFS); snapshots are always opened read-only.
    pub fn open_image(
        self: &Arc<Self>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Image, RbdError> {
        let desc = match snap {
            Some(s) => format!("{}@{s}", self.ctx(name)),
            None => self.ctx(name),
        };
        let c = cstr(name, &desc)?;
        let s = snap.map(|s| cstr(s, &desc)).transpose()?;
        let read_only = read_only || snap.is_some();
        let open = if read_only {
            self.api().rbd.rbd_open_read_only
        } else {
            self.api().rbd.rbd_open
        };
        let mut handle = ptr::null_mut();
        // SAFETY: valid ioctx, names, out-pointer.
        let r = unsafe { open(self.handle, c.as_ptr(), &mut handle, opt_ptr(&s)) };
        check(r.into(), "opening the image", || desc.clone())?;
        debug!(image = %desc, read_only, "opened rbd image");
        Ok(Image {
            ioctx: self.clone(),
            handle,
            desc,
            read_only,
        })
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: images hold an Arc to us, so none is open on this handle.
        unsafe { (self.api().rados.rados_ioctx_destroy)(self.handle) };
    }
}

/// An open image (`rbd_image_t`), at its head or at a snapshot.
pub struct Image {
    ioctx: Arc<IoCtx>,
    handle: ffi::rbd_image_t,
    desc: String,
    read_only: bool,
}

// SAFETY: librbd image handles are thread-safe (qemu issues I/O on one from
// several threads); the handle itself is never mutated by us.
unsafe impl Send for Image {}
unsafe impl Sync for Image {}

impl Image {
    pub(crate) fn api(&self) -> &'static Api {
        self.ioctx.api()
    }

    pub(crate) fn handle(&self) -> ffi::rbd_image_t {
        self.handle
    }

    /// "cluster conf ..., pool P, image I@S": for errors and logs.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn call(&self, op: &'static str, r: c_int) -> Result<(), RbdError> {
        check(r.into(), op, || self.desc.clone()).map(drop)
    }

    fn name_arg(&self, s: &str) -> Result<CString, RbdError> {
        cstr(s, &self.desc)
    }

    /// Size in bytes (of the snapshot, if opened at one).
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: valid image, out-pointer.
        self.call("rbd_get_size", unsafe {
            (self.api().rbd.rbd_get_size)(self.handle, &mut size)
        })?;
        Ok(size)
    }

    /// Object size in bytes (the unit of allocation and of whole-object diffs).
    pub fn object_size(&self) -> Result<u64, RbdError> {
        // SAFETY: a plain C struct; all-zero is a valid value.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<ffi::rbd_image_info_t>();
        // SAFETY: valid image, struct and its size.
        self.call("rbd_stat", unsafe {
            (self.api().rbd.rbd_stat)(self.handle, &mut info, len)
        })?;
        Ok(info.obj_size)
    }

    /// Feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64, RbdError> {
        let mut f = 0u64;
        // SAFETY: valid image, out-pointer.
        self.call("rbd_get_features", unsafe {
            (self.api().rbd.rbd_get_features)(self.handle, &mut f)
        })?;
        Ok(f)
    }

    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: valid image.
        self.call("rbd_resize", unsafe {
            (self.api().rbd.rbd_resize)(self.handle, size)
        })
    }

    /// Waits until every write completed so far is on the OSDs.
    pub fn flush(&self) -> Result<(), RbdError> {
        // SAFETY: valid image.
        self.call("rbd_flush", unsafe {
            (self.api().rbd.rbd_flush)(self.handle)
        })
    }

    pub fn snap_create(&self, snap: &str) -> Result<(), RbdError> {
        let c = self.name_arg(snap)?;
        // SAFETY: valid image and name.
        self.call("rbd_snap_create", unsafe {
            (self.api().rbd.rbd_snap_create)(self.handle, c.as_ptr())
        })
    }

    pub fn snap_remove(&self, snap: &str) -> Result<(), RbdError> {
        let c = self.name_arg(snap)?;
        // SAFETY: valid image and name.
        self.call("rbd_snap_remove", unsafe {
            (self.api().rbd.rbd_snap_remove)(self.handle, c.as_ptr())
        })
    }

    pub fn snap_protect(&self, snap: &str) -> Result<(), RbdError> {
        let c = self.name_arg(snap)?;
        // SAFETY: valid image and name.
        self.call("rbd_snap_protect", unsafe {
            (self.api().rbd.rbd_snap_protect)(self.handle, c.as_ptr())
        })
    }

    pub fn snap_unprotect(&self, snap: &str) -> Result<(), RbdError> {
        let c = self.name_arg(snap)?;
        // SAFETY: valid image and name.
        self.call("rbd_snap_unprotect", unsafe {
            (self.api().rbd.rbd_snap_unprotect)(self.handle, c.as_ptr())
        })
    }

    /// How many clients watch the image (a client that opened it for
    /// writing, such as a hypervisor, keeps a watch on its header).
    pub fn watcher_count(&self) -> Result<usize, RbdError> {
        let mut max: usize = 8;
        loop {
            let mut list: Vec<ffi::rbd_image_watcher_t> = Vec::with_capacity(max);
            // SAFETY: room for max entries; librbd sets max to the count.
            let r = unsafe {
                (self.api().rbd.rbd_watchers_list)(self.handle, list.as_mut_ptr(), &mut max)
            };
            if r == -libc::ERANGE {
                continue; // max now holds the count needed
            }
            self.call("rbd_watchers_list", r)?;
            // SAFETY: librbd filled max entries; cleanup frees their strings.
            unsafe {
                list.set_len(max);
                (self.api().rbd.rbd_watchers_list_cleanup)(list.as_mut_ptr(), max);
            }
            return Ok(max);
        }
    }

    pub fn snap_list(&self) -> Result<Vec<SnapInfo>, RbdError> {
        let mut max: c_int = 16;
        loop {
            // librbd also writes a terminating entry, hence the +1.
            let mut snaps: Vec<ffi::rbd_snap_info_t> = Vec::with_capacity(max as usize + 1);
            // SAFETY: room for max + 1 entries.
            let r = unsafe {
                (self.api().rbd.rbd_snap_list)(self.handle, snaps.as_mut_ptr(), &mut max)
            };
            if r == -libc::ERANGE {
                continue; // max now holds the count needed
            }
            self.call("rbd_snap_list", r)?;
            // SAFETY: librbd filled r entries (plus the terminator).
            unsafe { snaps.set_len(r as usize) };
            let out = snaps
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    // SAFETY: NUL-terminated string owned by librbd until list_end.
                    name: unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned(),
                })
                .collect();
            // SAFETY: frees the names of the list librbd filled in.
            unsafe { (self.api().rbd.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (k, v) = (self.name_arg(key)?, self.name_arg(value)?);
        // SAFETY: valid image and strings.
        self.call("rbd_metadata_set", unsafe {
            (self.api().rbd.rbd_metadata_set)(self.handle, k.as_ptr(), v.as_ptr())
        })
    }

    /// The value of a metadata key, `None` if it is not set.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, RbdError> {
        let k = self.name_arg(key)?;
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: buffer and its length; librbd updates len on ERANGE.
            let r = unsafe {
                (self.api().rbd.rbd_metadata_get)(
                    self.handle,
                    k.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            match r {
                r if r == -libc::ERANGE => continue,
                r if r == -libc::ENOENT => return Ok(None),
                r => self.call("rbd_metadata_get", r)?,
            }
            let value = nul_strings(&buf[..len.min(buf.len())]).next();
            return Ok(Some(value.unwrap_or_default()));
        }
    }

    /// Every metadata key and value, in key order.
    pub fn metadata_list(&self) -> Result<Vec<(String, String)>, RbdError> {
        let (mut klen, mut vlen) = (4096usize, 4096usize);
        loop {
            let (mut keys, mut vals) = (vec![0u8; klen], vec![0u8; vlen]);
            // SAFETY: both buffers with their lengths; "" starts at the first
            // key, 0 means no limit.
            let r = unsafe {
                (self.api().rbd.rbd_metadata_list)(
                    self.handle,
                    c"".as_ptr(),
                    0,
                    keys.as_mut_ptr().cast(),
                    &mut klen,
                    vals.as_mut_ptr().cast(),
                    &mut vlen,
                )
            };
            if r == -libc::ERANGE {
                continue;
            }
            self.call("rbd_metadata_list", r)?;
            if klen.min(keys.len()) == 0 || keys[0] == 0 {
                return Ok(Vec::new()); // no keys (a key is never empty)
            }
            let k = nul_strings(&keys[..klen.min(keys.len())]);
            let v = nul_strings(&vals[..vlen.min(vals.len())]);
            return Ok(k.zip(v).collect());
        }
    }

    /// Calls `cb(offset, len, exists)` for each extent that changed between
    /// `from_snap` (or the image's creation, with `None`) and what this
    /// handle has open (a snapshot or the head). `exists == false` means the
    /// extent was discarded since `from_snap`. With `whole_object`, extents
    /// are rounded out to whole objects, which librbd answers from the
    /// object map when fast-diff is enabled instead of asking every object.
    pub fn diff_iterate2(
        &self,
        from_snap: Option<&str>,
        offset: u64,
        len: u64,
        include_parent: bool,
        whole_object: bool,
        cb: &mut (dyn FnMut(u64, u64, bool) + Send),
    ) -> Result<(), RbdError> {
        let from = from_snap.map(|s| self.name_arg(s)).transpose()?;
        // librbd may run the callback on its own threads; the mutex keeps
        // calls to the FnMut one at a time.
        let state: Mutex<&mut (dyn FnMut(u64, u64, bool) + Send)> = Mutex::new(cb);
        // SAFETY: `state` outlives the call, which returns only once every
        // callback has run; the trampoline matches the C signature.
        let r = unsafe {
            (self.api().rbd.rbd_diff_iterate2)(
                self.handle,
                opt_ptr(&from),
                offset,
                len,
                u8::from(include_parent),
                u8::from(whole_object),
                diff_trampoline,
                &state as *const _ as *mut c_void,
            )
        };
        check(r.into(), "rbd_diff_iterate2", || {
            format!("{}, from {}", self.desc, from_snap.unwrap_or("creation"))
        })?;
        Ok(())
    }
}

type DiffState<'a> = Mutex<&'a mut (dyn FnMut(u64, u64, bool) + Send)>;

unsafe extern "C" fn diff_trampoline(
    off: u64,
    len: usize,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: arg is the &DiffState passed to rbd_diff_iterate2, alive for
    // the whole call.
    let state = unsafe { &*(arg as *const DiffState<'_>) };
    let mut cb = state.lock().unwrap_or_else(|e| e.into_inner());
    (*cb)(off, len as u64, exists != 0);
    0
}

/// The NUL-terminated strings packed in `buf` (at least one, maybe empty).
fn nul_strings(buf: &[u8]) -> impl Iterator<Item = String> + '_ {
    let buf = buf.strip_suffix(&[0]).unwrap_or(buf);
    buf.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the device waits for its in-flight requests before it
        // drops the image; rbd_close flushes librbd's cache.
        let r = unsafe { (self.api().rbd.rbd_close)(self.handle) };
        if r < 0 {
            tracing::warn!(image = %self.desc, error = %io::Error::from_raw_os_error(-r), "rbd_close failed");
        }
    }
}
