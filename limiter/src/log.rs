//! Logging to stderr without touching the application's stdout: one pre-formatted line per
//! message, written with a single `write(2)` so lines from several threads never interleave.
//! The level is read once from `VCUDA_LOG` (`error`, `warn` (default), `info`, `debug`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

fn level() -> u8 {
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let v = match std::env::var_os("VCUDA_LOG")
        .as_deref()
        .and_then(|s| s.to_str())
    {
        Some("error") => Level::Error,
        Some("info") => Level::Info,
        Some("debug") => Level::Debug,
        _ => Level::Warn,
    } as u8;
    LEVEL.store(v, Ordering::Relaxed);
    v
}

/// A fixed buffer that truncates instead of allocating or failing.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len().saturating_sub(self.len + 1);
        let n = s.len().min(room);
        if let (Some(dst), Some(src)) = (
            self.buf.get_mut(self.len..self.len + n),
            s.as_bytes().get(..n),
        ) {
            dst.copy_from_slice(src);
            self.len += n;
        }
        Ok(())
    }
}

/// Write one line if `lvl` is enabled.
pub fn line(lvl: Level, args: std::fmt::Arguments<'_>) {
    if lvl as u8 > level() {
        return;
    }
    let mut l = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = l.write_str("vcuda: ");
    let _ = l.write_fmt(args);
    if let Some(b) = l.buf.get_mut(l.len) {
        *b = b'\n';
        l.len += 1;
    }
    // SAFETY: writes `len` initialised bytes of a live stack buffer to fd 2; a failed write
    // (closed stderr) is ignored.
    unsafe {
        libc::write(2, l.buf.as_ptr().cast(), l.len);
    }
}

macro_rules! error { ($($t:tt)*) => { $crate::log::line($crate::log::Level::Error, format_args!($($t)*)) } }
macro_rules! warning { ($($t:tt)*) => { $crate::log::line($crate::log::Level::Warn, format_args!($($t)*)) } }
macro_rules! info { ($($t:tt)*) => { $crate::log::line($crate::log::Level::Info, format_args!($($t)*)) } }
macro_rules! debug { ($($t:tt)*) => { $crate::log::line($crate::log::Level::Debug, format_args!($($t)*)) } }
pub(crate) use {debug, error, info, warning};
