//! The project's generated microvm test firmware ("Test firmware" in the
//! vectors README): a 128 KiB data file given to QEMU with `-bios`, so no
//! third-party firmware is in any stream. It is never executed.

use super::pattern::{stream, PAGE};

/// Size of the image: 32 pages.
pub const FIRMWARE_BYTES: usize = 131072;
/// SHA-256 of the image.
pub const FIRMWARE_SHA256: &str =
    "a924f8929c0f5c671bcc9c4633b7a8fbf2903b6f3f181e5f4cf9c41ab05ab627";
/// The ASCII marker in bytes 0-63.
pub const FIRMWARE_MARKER: &[u8; 64] =
    b"qmig test firmware v1: pattern data, not a BIOS, never executed\n";
/// The last 16 bytes (x86 reset vector): cli; hlt; jmp to the hlt.
pub const RESET_VECTOR: [u8; 16] = [0xfa, 0xf4, 0xeb, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Generates the test firmware image.
pub fn test_firmware() -> Vec<u8> {
    let mut img = Vec::with_capacity(FIRMWARE_BYTES);
    for p in 0..(FIRMWARE_BYTES / PAGE) as u32 {
        if p % 4 == 2 {
            img.extend_from_slice(&[0u8; PAGE]);
        } else {
            let mut label = b"test-firmware".to_vec();
            label.extend_from_slice(&p.to_le_bytes());
            img.extend_from_slice(&stream(0, &label, PAGE));
        }
    }
    img[..64].copy_from_slice(FIRMWARE_MARKER);
    img[FIRMWARE_BYTES - 16..].copy_from_slice(&RESET_VECTOR);
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::pattern::sha256_hex;

    #[test]
    fn firmware_has_the_published_sha256() {
        let img = test_firmware();
        assert_eq!(img.len(), FIRMWARE_BYTES);
        assert_eq!(sha256_hex(&img), FIRMWARE_SHA256);
    }
}
