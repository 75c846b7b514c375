//! hpmig-core: everything in hpmig that is not a wire or a device.
pub mod dirty;
pub mod land;
pub mod memory;
pub mod precopy;
pub mod protocol;
pub mod ring;
pub mod segment;
pub mod transport;
pub mod vm;
