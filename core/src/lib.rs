//! Pure domain logic of the GPU manager. No I/O, no async.
//!
//! Every decision the system makes lives here so that the device plugin, the scheduler
//! extender, the admission webhook and the trace simulator all share one implementation:
//!
//! * [`resources`]: resource names (configurable domain) and units;
//! * [`quantity`]: Kubernetes quantity strings to integers;
//! * [`request`]: container and pod requests parsed and validated against the resource contract;
//! * [`annotations`]: every pod/node annotation key we own, with its codec;
//! * [`inventory`]: the node's cards and their link matrix, with a versioned JSON codec;
//! * [`topology`]: link-quality domains derived from the link matrix;
//! * [`ledger`]: free vcuda-core and memory blocks per card, allocate/release by assignment;
//! * [`placement`]: the placement policies (`binpack`, `spread`, `topology`) and node choice.

pub mod annotations;
pub mod devices;
pub mod duration;
pub mod fgd;
pub mod fgd_plus;
pub mod health;
pub mod inventory;
pub mod ledger;
pub mod placement;
pub mod quantity;
pub mod quota;
pub mod request;
pub mod resources;
pub mod topology;

pub use inventory::{Card, Link, NodeInventory};

pub use ledger::{Assignment, CardCharge, Charge, NodeLedger};
pub use placement::{Placement, Policy};
pub use request::{GpuRequest, PodGpuRequest};
pub use resources::ResourceNames;
