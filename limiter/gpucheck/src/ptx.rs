//! The kernels, as PTX text the driver JIT-compiles (no nvcc on the device machine).
//!
//! * `busy(u64 cycles)`: each thread spins on `%clock64` until `cycles` SM clocks have passed.
//!   The duration is wall time on the SM: it does not stretch when another context time-slices
//!   the GPU (the clock keeps counting while the kernel is switched out).
//! * `work(u64 iters)`: a fixed number of loop iterations (each reads `%clock64` and folds it
//!   into an accumulator stored to a module global, so the loop cannot be optimised away). Its
//!   duration does stretch under time-slicing, so completions measure GPU time received.
//! * `noop()`: returns at once (launch-overhead measurements).
//!
//! PTX ISA 7.0 / sm_70 so that every driver from CUDA 11.0 on JITs it for sm_90 (H100/H200).

use std::ffi::CStr;

/// The module text, NUL-terminated for `cuModuleLoadData`.
pub const KERNELS: &CStr = c"//
// gpucheck kernels (hand-written PTX)
//
.version 7.0
.target sm_70
.address_size 64

.visible .global .align 8 .u64 gpucheck_sink;

.visible .entry noop()
{
\tret;
}

.visible .entry busy(
\t.param .u64 busy_param_cycles
)
{
\t.reg .pred \t%p<2>;
\t.reg .b64 \t%rd<5>;

\tld.param.u64 \t%rd1, [busy_param_cycles];
\tmov.u64 \t%rd2, %clock64;
BUSY_SPIN:
\tmov.u64 \t%rd3, %clock64;
\tsub.s64 \t%rd4, %rd3, %rd2;
\tsetp.lt.u64 \t%p1, %rd4, %rd1;
\t@%p1 bra \tBUSY_SPIN;
\tret;
}

.visible .entry work(
\t.param .u64 work_param_iters
)
{
\t.reg .pred \t%p<2>;
\t.reg .b64 \t%rd<5>;

\tld.param.u64 \t%rd1, [work_param_iters];
\tmov.u64 \t%rd2, 0;
\tmov.u64 \t%rd3, 0;
WORK_LOOP:
\tmov.u64 \t%rd4, %clock64;
\txor.b64 \t%rd3, %rd3, %rd4;
\tadd.s64 \t%rd2, %rd2, 1;
\tsetp.lt.u64 \t%p1, %rd2, %rd1;
\t@%p1 bra \tWORK_LOOP;
\tst.volatile.global.u64 \t[gpucheck_sink], %rd3;
\tret;
}
";

pub const BUSY: &CStr = c"busy";
pub const WORK: &CStr = c"work";
pub const NOOP: &CStr = c"noop";

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> &'static str {
        KERNELS.to_str().expect("PTX is ASCII")
    }

    #[test]
    fn header_targets_a_version_every_h100_driver_jits() {
        let t = text();
        assert!(t.contains(".version 7.0\n"));
        assert!(t.contains(".target sm_70\n"));
        assert!(t.contains(".address_size 64\n"));
        assert!(t.is_ascii());
    }

    #[test]
    fn every_entry_is_declared_once_with_its_parameter() {
        let t = text();
        for name in [BUSY, WORK, NOOP] {
            let n = name.to_str().unwrap();
            assert_eq!(
                t.matches(&format!(".visible .entry {n}(")).count(),
                1,
                "{n}"
            );
        }
        assert!(t.contains(".param .u64 busy_param_cycles"));
        assert!(t.contains("[busy_param_cycles]"));
        assert!(t.contains(".param .u64 work_param_iters"));
        assert!(t.contains("[work_param_iters]"));
    }

    #[test]
    fn braces_balance_and_every_body_returns() {
        let t = text();
        assert_eq!(t.matches('{').count(), t.matches('}').count());
        assert_eq!(t.matches('{').count(), 3);
        assert_eq!(t.matches("\tret;").count(), 3);
    }

    #[test]
    fn registers_used_are_declared() {
        // %rd<5> declares %rd0..%rd4; %p<2> declares %p0..%p1.
        let t = text();
        for i in 5..10 {
            assert!(!t.contains(&format!("%rd{i}")), "%rd{i} is not declared");
        }
        assert!(!t.contains("%p2"));
        // Every branch target exists as a label.
        for label in ["BUSY_SPIN", "WORK_LOOP"] {
            assert!(t.contains(&format!("\n{label}:\n")), "{label}");
        }
    }
}
