//! The exported hooks. Each has the exact C signature of the driver or NVML function of the
//! same name; their contract is NVIDIA's, so they carry no `# Safety` sections of their own.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

mod init;
mod launch;
mod mem;
mod report;

pub use init::*;
pub use launch::*;
pub use mem::*;
pub use report::*;
