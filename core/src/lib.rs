//! hpmig-core: everything in hpmig that is not a wire or a device.
pub mod memory;
pub mod protocol;
pub mod ring;
pub mod segment;
