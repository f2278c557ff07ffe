//! One error type for every check; its `Display` is the text of the JSON `"error"` field.

use std::fmt;

#[derive(Debug, Clone)]
pub enum Error {
    /// A driver call returned non-zero.
    Cuda {
        func: &'static str,
        code: i32,
        name: String,
    },
    /// An NVML call returned non-zero.
    Nvml { func: &'static str, code: i32 },
    /// An entry point the check needs is not exported by the library.
    Missing { lib: String, sym: &'static str },
    /// Anything else (bad arguments, I/O, JIT log).
    Other(String),
    /// Already printed as a JSON line with an `"error"` field; only the exit code is left.
    Reported,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The driver/NVML status code, when there is one.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Cuda { code, .. } | Error::Nvml { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cuda { func, code, name } => write!(f, "{func} failed: {code} ({name})"),
            Error::Nvml { func, code } => {
                write!(f, "{func} failed: {code} ({})", nvml_error_name(*code))
            }
            Error::Missing { lib, sym } => write!(f, "{sym} not found in {lib}"),
            Error::Other(s) => f.write_str(s),
            Error::Reported => f.write_str("reported above"),
        }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Other(s)
    }
}

/// `CUresult` names for the codes gpucheck can plausibly meet (the driver's own
/// `cuGetErrorName` is preferred when it resolves).
pub fn cuda_error_name(code: i32) -> &'static str {
    match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        4 => "CUDA_ERROR_DEINITIALIZED",
        34 => "CUDA_ERROR_STUB_LIBRARY",
        46 => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        201 => "CUDA_ERROR_INVALID_CONTEXT",
        209 => "CUDA_ERROR_NO_BINARY_FOR_GPU",
        218 => "CUDA_ERROR_INVALID_PTX",
        221 => "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",
        222 => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        400 => "CUDA_ERROR_INVALID_HANDLE",
        500 => "CUDA_ERROR_NOT_FOUND",
        600 => "CUDA_ERROR_NOT_READY",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        702 => "CUDA_ERROR_LAUNCH_TIMEOUT",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        802 => "CUDA_ERROR_SYSTEM_NOT_READY",
        803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        804 => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => "unrecognised CUresult",
    }
}

/// `nvmlReturn_t` names.
pub fn nvml_error_name(code: i32) -> &'static str {
    match code {
        0 => "NVML_SUCCESS",
        1 => "NVML_ERROR_UNINITIALIZED",
        2 => "NVML_ERROR_INVALID_ARGUMENT",
        3 => "NVML_ERROR_NOT_SUPPORTED",
        4 => "NVML_ERROR_NO_PERMISSION",
        5 => "NVML_ERROR_ALREADY_INITIALIZED",
        6 => "NVML_ERROR_NOT_FOUND",
        7 => "NVML_ERROR_INSUFFICIENT_SIZE",
        8 => "NVML_ERROR_INSUFFICIENT_POWER",
        9 => "NVML_ERROR_DRIVER_NOT_LOADED",
        10 => "NVML_ERROR_TIMEOUT",
        11 => "NVML_ERROR_IRQ_ISSUE",
        12 => "NVML_ERROR_LIBRARY_NOT_FOUND",
        13 => "NVML_ERROR_FUNCTION_NOT_FOUND",
        14 => "NVML_ERROR_CORRUPTED_INFOROM",
        15 => "NVML_ERROR_GPU_IS_LOST",
        16 => "NVML_ERROR_RESET_REQUIRED",
        17 => "NVML_ERROR_OPERATING_SYSTEM",
        18 => "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
        19 => "NVML_ERROR_IN_USE",
        20 => "NVML_ERROR_MEMORY",
        21 => "NVML_ERROR_NO_DATA",
        999 => "NVML_ERROR_UNKNOWN",
        _ => "unrecognised nvmlReturn_t",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_json_error_text() {
        let e = Error::Cuda {
            func: "cuInit",
            code: 100,
            name: cuda_error_name(100).into(),
        };
        assert_eq!(e.to_string(), "cuInit failed: 100 (CUDA_ERROR_NO_DEVICE)");
        assert_eq!(e.code(), Some(100));
        let e = Error::Nvml {
            func: "nvmlInit_v2",
            code: 9,
        };
        assert_eq!(
            e.to_string(),
            "nvmlInit_v2 failed: 9 (NVML_ERROR_DRIVER_NOT_LOADED)"
        );
        let e = Error::Missing {
            lib: "libcuda.so.1".into(),
            sym: "cuMemCreate",
        };
        assert_eq!(e.to_string(), "cuMemCreate not found in libcuda.so.1");
        assert_eq!(e.code(), None);
    }
}
