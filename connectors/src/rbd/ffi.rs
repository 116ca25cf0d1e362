//! The C API of librados 2 / librbd 1 (Ceph 16.2 headers), loaded at run
//! time.
//!
//! volback must build and run where Ceph is not installed, so nothing links
//! against these libraries: they are opened with `dlopen` the first time an
//! `rbd:` device is used, every symbol is resolved once into a table of
//! function pointers, and the table lives for the rest of the process (the
//! libraries are never unloaded, so the pointers stay valid).

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = unsafe extern "C" fn(rbd_completion_t, *mut c_void);
pub type diff_cb_t = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

#[repr(C)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

#[repr(C)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct rados_cluster_stat_t {
    pub kb: u64,
    pub kb_used: u64,
    pub kb_avail: u64,
    pub num_objects: u64,
}

/// Declares a table of C functions and how to resolve it from one library.
macro_rules! c_api {
    ($table:ident { $( fn $name:ident($($arg:ty),*) $(-> $ret:ty)?; )* }) => {
        pub struct $table {
            $( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl $table {
            fn resolve(lib: &Library, file: &str) -> Result<Self, String> {
                Ok(Self {
                    $( $name: {
                        // SAFETY: the type is the one in the 16.2 header; the
                        // library stays loaded for the life of the process.
                        let sym = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                        };
                        *sym.map_err(|e| format!(
                            "{file} has no {} ({e}): Ceph 14 (nautilus) or newer is needed",
                            stringify!($name)
                        ))?
                    }, )*
                })
            }
        }
    };
}

c_api!(RadosFns {
    fn rados_create(*mut rados_t, *const c_char) -> c_int;
    fn rados_conf_read_file(rados_t, *const c_char) -> c_int;
    fn rados_conf_set(rados_t, *const c_char, *const c_char) -> c_int;
    fn rados_connect(rados_t) -> c_int;
    fn rados_shutdown(rados_t);
    fn rados_cluster_fsid(rados_t, *mut c_char, usize) -> c_int;
    fn rados_pool_lookup(rados_t, *const c_char) -> i64;
    fn rados_cluster_stat(rados_t, *mut rados_cluster_stat_t) -> c_int;
    fn rados_ioctx_create(rados_t, *const c_char, *mut rados_ioctx_t) -> c_int;
    fn rados_ioctx_destroy(rados_ioctx_t);
    fn rados_ioctx_set_namespace(rados_ioctx_t, *const c_char);
});

c_api!(RbdFns {
    fn rbd_create2(rados_ioctx_t, *const c_char, u64, u64, *mut c_int) -> c_int;
    fn rbd_remove(rados_ioctx_t, *const c_char) -> c_int;
    fn rbd_list2(rados_ioctx_t, *mut rbd_image_spec_t, *mut usize) -> c_int;
    fn rbd_image_spec_list_cleanup(*mut rbd_image_spec_t, usize);
    fn rbd_clone(rados_ioctx_t, *const c_char, *const c_char, rados_ioctx_t, *const c_char, u64, *mut c_int) -> c_int;
    fn rbd_open(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    fn rbd_open_read_only(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    fn rbd_close(rbd_image_t) -> c_int;
    fn rbd_get_size(rbd_image_t, *mut u64) -> c_int;
    fn rbd_stat(rbd_image_t, *mut rbd_image_info_t, usize) -> c_int;
    fn rbd_get_features(rbd_image_t, *mut u64) -> c_int;
    fn rbd_resize(rbd_image_t, u64) -> c_int;
    fn rbd_flush(rbd_image_t) -> c_int;
    fn rbd_watchers_list(rbd_image_t, *mut rbd_image_watcher_t, *mut usize) -> c_int;
    fn rbd_watchers_list_cleanup(*mut rbd_image_watcher_t, usize);
    fn rbd_snap_create(rbd_image_t, *const c_char) -> c_int;
    fn rbd_snap_remove(rbd_image_t, *const c_char) -> c_int;
    fn rbd_snap_list(rbd_image_t, *mut rbd_snap_info_t, *mut c_int) -> c_int;
    fn rbd_snap_list_end(*mut rbd_snap_info_t);
    fn rbd_snap_protect(rbd_image_t, *const c_char) -> c_int;
    fn rbd_snap_unprotect(rbd_image_t, *const c_char) -> c_int;
    fn rbd_metadata_get(rbd_image_t, *const c_char, *mut c_char, *mut usize) -> c_int;
    fn rbd_metadata_set(rbd_image_t, *const c_char, *const c_char) -> c_int;
    fn rbd_metadata_list(rbd_image_t, *const c_char, u64, *mut c_char, *mut usize, *mut c_char, *mut usize) -> c_int;
    fn rbd_diff_iterate2(rbd_image_t, *const c_char, u64, u64, u8, u8, diff_cb_t, *mut c_void) -> c_int;
    fn rbd_aio_create_completion(*mut c_void, rbd_callback_t, *mut rbd_completion_t) -> c_int;
    fn rbd_aio_get_return_value(rbd_completion_t) -> isize;
    fn rbd_aio_release(rbd_completion_t);
    fn rbd_aio_read(rbd_image_t, u64, usize, *mut c_char, rbd_completion_t) -> c_int;
    fn rbd_aio_write(rbd_image_t, u64, usize, *const c_char, rbd_completion_t) -> c_int;
    fn rbd_aio_write_zeroes(rbd_image_t, u64, usize, rbd_completion_t, c_int, c_int) -> c_int;
    fn rbd_aio_flush(rbd_image_t, rbd_completion_t) -> c_int;
});

/// Both tables, plus the libraries that keep them valid.
pub struct Api {
    pub rados: RadosFns,
    pub rbd: RbdFns,
    _libs: [Library; 2],
}

const LIBRADOS: &str = "librados.so.2";
const LIBRBD: &str = "librbd.so.1";

/// The process-wide table, loaded on first use. A failure is remembered too:
/// retrying a missing library on every open would only repeat the message.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let open = |file: &str, package: &str| {
        // SAFETY: loading runs the libraries' initialisers, which is what
        // linking against them would do too.
        unsafe { Library::new(file) }
            .map_err(|e| format!("{file} could not be loaded: install {package} ({e})"))
    };
    // librbd needs librados anyway; opening it first names the right package.
    let rados_lib = open(LIBRADOS, "librados2")?;
    let rbd_lib = open(LIBRBD, "librbd1")?;
    let rados = RadosFns::resolve(&rados_lib, LIBRADOS)?;
    let rbd = RbdFns::resolve(&rbd_lib, LIBRBD)?;
    tracing::debug!("loaded {LIBRADOS} and {LIBRBD}");
    Ok(Api {
        rados,
        rbd,
        _libs: [rados_lib, rbd_lib],
    })
}
