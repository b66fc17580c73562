//! Files the library reads whole (a config file, a codec module, the TLS files), each
//! through a
//! bounded reader: a path naming `/dev/zero` or a huge file is refused with its size
//! instead of filling memory until the OOM killer comes. The size a file's metadata
//! gives is not trusted (a device or a pipe says 0); the read itself stops one byte
//! past the limit.
//!
//! A file that must be a regular file (a codec module, a TLS file) is also looked at
//! before it is read: a directory or a FIFO named there is said to be one, instead of
//! "no such file" or a read that waits forever for a FIFO's writer.

use std::fs::{File, FileType, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest config file read (`Config::from_file`, the daemon's `--config`): a
/// config of thousands of servers and subscriptions is well under 1 MiB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

/// The largest codec module read (`codec.path`, `wirepool codec-check`): the built-in
/// codecs are 30 to 60 KiB, and one written in a language with a large runtime (Go)
/// a few MiB.
pub const MAX_CODEC_FILE_BYTES: u64 = 64 << 20;

/// The largest TLS file read (`tls.ca_file`, `tls.client_cert`, `tls.client_key`): a
/// whole public CA bundle (Mozilla's, every root in PEM) is about 200 KiB, and a
/// private one or a long client chain far less.
pub const MAX_TLS_FILE_BYTES: u64 = 16 << 20;

/// Reads `path` whole, refusing it once more than `limit` bytes came. The error says
/// what the file is (`kind`: "config file"), the limit and the size seen; it does not
/// repeat the path, which the caller names.
pub(crate) fn read_capped(path: &Path, limit: u64, kind: &str) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|err| format!("cannot read: {err}"))?;
    read_open_capped(file, path, limit, kind)
}

/// Like [`read_capped`], for a file that must be a regular file: anything else (a
/// directory, a FIFO, a device) is refused, saying what it is, without reading from it.
/// It is opened non-blocking, so that a FIFO without a writer does not hold the open
/// up, and its type is taken from the open file (no window for it to be swapped).
pub(crate) fn read_regular_capped(path: &Path, limit: u64, kind: &str) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => format!("cannot read: {err}"),
        })?;
    let metadata = file
        .metadata()
        .map_err(|err| format!("cannot read: {err}"))?;
    not_regular(metadata.file_type()).map_or(Ok(()), Err)?;
    read_open_capped(file, path, limit, kind)
}

/// Looks at what `path` names without opening it (a FIFO is not waited on): its
/// metadata when it is a regular file, else what it is instead ("no such file", "is a
/// directory", ...).
pub(crate) fn regular_file(path: &Path) -> Result<Metadata, String> {
    let metadata = std::fs::metadata(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => format!("cannot read: {err}"),
    })?;
    match not_regular(metadata.file_type()) {
        Some(what) => Err(what),
        None => Ok(metadata),
    }
}

/// What a file that is not a regular file is, as an error; `None` for a regular file.
fn not_regular(file_type: FileType) -> Option<String> {
    let what = if file_type.is_file() {
        return None;
    } else if file_type.is_dir() {
        return Some("is a directory, not a file".into());
    } else if file_type.is_fifo() {
        "a named pipe (FIFO)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "something other than a file"
    };
    Some(format!("is {what}, not a regular file"))
}

fn read_open_capped(file: File, path: &Path, limit: u64, kind: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot read: {err}"))?;
    let read = bytes.len() as u64;
    if read <= limit {
        return Ok(bytes);
    }
    // A regular file's length says how much more there was; anything else, that there
    // was more than the limit.
    let seen = std::fs::metadata(path)
        .ok()
        .filter(|metadata| metadata.is_file())
        .map_or(read, |metadata| metadata.len().max(read));
    Err(format!(
        "too large for a {kind}: at least {seen} bytes, the limit is {}",
        describe_limit(limit)
    ))
}

fn describe_limit(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB ({bytes} bytes)", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_end_is_refused_after_the_limit_not_read_forever() {
        let err = read_capped(Path::new("/dev/zero"), 1 << 20, "config file")
            .expect_err("/dev/zero is larger than any limit");
        assert!(
            err.contains("config file") && err.contains("1 MiB") && err.contains("1048577 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_file_at_the_limit_is_read_and_one_over_it_is_refused_with_its_size() {
        let dir = std::env::temp_dir().join(format!("wirepool-file-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("at-limit");
        std::fs::write(&path, vec![b'x'; 4096]).expect("written");
        assert_eq!(
            read_capped(&path, 4096, "codec module").map(|b| b.len()),
            Ok(4096)
        );
        std::fs::write(&path, vec![b'x'; 10_000]).expect("written");
        let err = read_capped(&path, 4096, "codec module").expect_err("over the limit");
        assert!(
            err.contains("at least 10000 bytes") && err.contains("4096 bytes"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_or_a_fifo_is_said_to_be_one_and_a_fifo_is_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("wirepool-not-regular-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
        // No writer ever opens the FIFO: a blocking open or read would hang here.
        let err = read_regular_capped(&fifo, 1 << 20, "codec module").expect_err("a FIFO");
        assert_eq!(err, "is a named pipe (FIFO), not a regular file");
        assert_eq!(regular_file(&fifo).map(|_| ()), Err(err));
        let err = read_regular_capped(&dir, 1 << 20, "codec module").expect_err("a directory");
        assert_eq!(err, "is a directory, not a file");
        assert_eq!(regular_file(&dir).map(|_| ()), Err(err));
        let err = read_regular_capped(Path::new("/dev/zero"), 1 << 20, "codec module")
            .expect_err("a device");
        assert_eq!(err, "is a character device, not a regular file");
        let missing = dir.join("missing");
        assert_eq!(
            read_regular_capped(&missing, 1 << 20, "codec module"),
            Err("no such file".to_string())
        );
        assert_eq!(
            regular_file(&missing).map(|_| ()),
            Err("no such file".to_string())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
