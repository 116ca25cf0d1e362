//! `struct loop_info64` and LOOP_GET_STATUS64 from <linux/loop.h>, shared
//! by the local connector (a loop device's allocation map is its backing
//! file's) and the file driver's loop-device management.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

pub const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;
pub const LO_NAME_SIZE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl LoopInfo64 {
    pub fn zeroed() -> Self {
        // SAFETY: a plain C struct of integers and byte arrays; all zeroes is
        // its "nothing set" value.
        unsafe { std::mem::zeroed() }
    }
}

/// The status of a loop device, or None when it is not bound to a file.
pub fn loop_status(fd: impl AsFd) -> io::Result<Option<LoopInfo64>> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64 we own.
    if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) } != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(info))
}
