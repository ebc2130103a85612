//! Local files (a trust policy, registry credentials, a proof given to the CLI) read with a
//! size cap, so that a wrong path to a huge file is refused without reading all of it.

use std::io::Read;
use std::path::Path;

/// Reads at most `cap + 1` bytes of `path`: a result longer than `cap` means the file is over
/// the cap, and the caller refuses it with its own message.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_one_byte_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_capped(&path, 100).unwrap(), b"0123456789");
        assert_eq!(read_capped(&path, 10).unwrap().len(), 10);
        assert_eq!(read_capped(&path, 4).unwrap(), b"01234");
        assert!(read_capped(&dir.path().join("missing"), 4).is_err());
    }
}
