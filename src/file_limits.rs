//! Files the library reads whole (a config file, a codec module), each through a
//! bounded reader: a path naming `/dev/zero` or a huge file is refused with its size
//! instead of filling memory until the OOM killer comes. The size a file's metadata
//! gives is not trusted (a device or a pipe says 0); the read itself stops one byte
//! past the limit.

use std::io::Read;
use std::path::Path;

/// The largest config file read (`Config::from_file`, the daemon's `--config`): a
/// config of thousands of servers and subscriptions is well under 1 MiB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

/// The largest codec module read (`codec.path`, `wirepool codec-check`): the built-in
/// codecs are 30 to 60 KiB, and one written in a language with a large runtime (Go)
/// a few MiB.
pub const MAX_CODEC_FILE_BYTES: u64 = 64 << 20;

/// Reads `path` whole, refusing it once more than `limit` bytes came. The error says
/// what the file is (`kind`: "config file"), the limit and the size seen; it does not
/// repeat the path, which the caller names.
pub(crate) fn read_capped(path: &Path, limit: u64, kind: &str) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|err| format!("cannot read: {err}"))?;
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
}
