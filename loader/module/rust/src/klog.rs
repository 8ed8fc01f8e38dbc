//! printk from Rust: format into a bounded stack buffer (no allocation, usable in any
//! context), then hand the bytes to the glue with an explicit length.
use core::fmt;

/// A fixed-capacity byte buffer that silently truncates (and marks the truncation).
pub struct FixedBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> FixedBuf<N> {
    pub const fn new() -> Self {
        Self { buf: [0; N], len: 0, truncated: false }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> fmt::Write for FixedBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N.saturating_sub(self.len);
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() && !self.truncated {
            self.truncated = true;
            // Mark the cut with "..." in the last three bytes.
            let n = self.len.min(3);
            for b in &mut self.buf[self.len - n..self.len] {
                *b = b'.';
            }
        }
        Ok(())
    }
}

pub const ERR: i32 = 0;
pub const WARN: i32 = 1;
pub const INFO: i32 = 2;

pub fn log(level: i32, args: fmt::Arguments<'_>) {
    let mut buf = FixedBuf::<320>::new();
    let _ = fmt::write(&mut buf, args);
    let s = buf.as_bytes();
    // SAFETY: `s` is valid for reads of `s.len()` bytes during the call; the glue copies it
    // into the printk ring and keeps no reference.
    unsafe { crate::ffi::kdbt_glue_log(level, s.as_ptr(), s.len()) }
}

macro_rules! kinfo {
    ($($t:tt)*) => { $crate::klog::log($crate::klog::INFO, format_args!($($t)*)) };
}
#[allow(unused_macros)]
macro_rules! kwarn {
    ($($t:tt)*) => { $crate::klog::log($crate::klog::WARN, format_args!($($t)*)) };
}
#[allow(unused_macros)]
macro_rules! kerr {
    ($($t:tt)*) => { $crate::klog::log($crate::klog::ERR, format_args!($($t)*)) };
}
