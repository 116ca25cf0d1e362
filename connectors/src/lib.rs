//! volback's block-device I/O layer.
//!
//! A connector turns connection information (a path, later an iSCSI or RBD
//! address) into an attached [`BlockDevice`]: a queue of positional I/O
//! requests that owns each buffer until its completion is reaped. The copy
//! engine drives any device through that one interface; optional
//! capabilities (an allocation map, write-zeroes) are opted into per device.

mod buffer;
mod device;
mod error;
pub mod iscsi;
pub mod local;
pub mod loopinfo;
pub mod rbd;

pub use buffer::{is_zero, AlignedBuf, DiscardTarget, HUGE_PAGE};
pub use device::{AllocationMap, BlockDevice, Completion, Extent, IoOp, Returned, ZeroMode};
pub use error::{DeviceError, ErrorKind};

/// Alignment every [`AlignedBuf`] gets: a page, which satisfies O_DIRECT on
/// every device we attach (logical block sizes are 512 or 4096).
pub const BUFFER_ALIGN: usize = 4096;
