//! Links qmig-protocol without `std` (see Cargo.toml).
#![no_std]

use qmig_protocol::reader::Reader;
use qmig_protocol::Rule;

/// Exercises the decoder so the protocol code is really linked in.
#[no_mangle]
pub extern "C" fn qmig_no_std_probe(ptr: *const u8, len: usize) -> u32 {
    if ptr.is_null() {
        return u32::MAX;
    }
    // SAFETY: the caller passes a valid buffer of `len` bytes.
    let input = unsafe { core::slice::from_raw_parts(ptr, len) };
    let mut r = Reader::new(input, 0);
    match r.be32() {
        Ok(v) => v,
        Err(_) => Rule::HdrMagic as u32,
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
