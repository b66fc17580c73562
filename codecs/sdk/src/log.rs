//! Logging through the host's logger: the optional `wirepool.log` import.
//!
//! The import is only linked into a module that calls [`log`]; on the host (tests) the
//! message goes to stderr instead.

/// Log levels of `wirepool.log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Level {
    /// 1
    Error = 1,
    /// 2
    Warn = 2,
    /// 3
    Info = 3,
    /// 4
    Debug = 4,
    /// 5
    Trace = 5,
}

#[cfg(target_arch = "wasm32")]
mod host {
    #[link(wasm_import_module = "wirepool")]
    extern "C" {
        #[link_name = "log"]
        pub fn wirepool_log(level: i32, ptr: i32, len: i32);
    }
}

/// Logs a UTF-8 message through the host (which truncates it at 4 KiB).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host only reads `len` bytes at `ptr`, which `message` owns for the call.
    unsafe {
        host::wirepool_log(
            level as i32,
            message.as_ptr() as usize as i32,
            message.len() as i32,
        );
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("codec log level {}: {message}", level as i32);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
