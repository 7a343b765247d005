//! The userfaultfd kernel ABI, and a file-descriptor wrapper with one method per ioctl.
//!
//! Written against the Linux UAPI (`linux/userfaultfd.h`, `linux/fs.h` for `PAGEMAP_SCAN`) rather
//! than through the `userfaultfd` crate: that crate generates its bindings with bindgen at build
//! time (so every build of the workspace would need libclang), it has no `UFFD_FEATURE_WP_ASYNC`
//! / `WP_UNPOPULATED` and no `PAGEMAP_SCAN`, and it reports the `-EAGAIN` "mapping changing"
//! result of `UFFDIO_COPY` as a partial copy of `usize::MAX - 10` bytes. The structures below are
//! the kernel's stable ABI; each ioctl returns the kernel's progress count and errno untouched.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

const UFFDIO: u64 = 0xAA;
/// `UFFD_API`: the API version passed to `UFFDIO_API`.
pub const UFFD_API: u64 = 0xAA;

/// Feature bits of `uffdio_api.features`.
pub mod feature {
    /// Write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFDIO_WRITEPROTECT` on never-populated anonymous pages installs markers, so their first
    /// write is tracked too (Linux 6.4).
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// Write-protect faults are resolved by the kernel itself (no message), leaving the page
    /// "written" for `PAGEMAP_SCAN` (Linux 6.7).
    pub const WP_ASYNC: u64 = 1 << 15;
}

/// `UFFDIO_REGISTER` modes.
pub mod mode {
    /// Faults on missing pages.
    pub const MISSING: u64 = 1 << 0;
    /// Write-protect faults.
    pub const WP: u64 = 1 << 1;
}

/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// API version in; unchanged out.
    pub api: u64,
    /// Requested features in; every available feature out.
    pub features: u64,
    /// Available ioctls out.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault member of the union is decoded.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags` for page faults.
    pub flags: u64,
    /// `arg.pagefault.address` for page faults.
    pub address: u64,
    feat: u64,
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, 24);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

/// Result of a ranged fill ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled.
    Done,
    /// The first `n` bytes (n > 0, a page multiple) were filled, then the kernel stopped (it
    /// returns `EAGAIN` for any short fill; the page at `n` may be present or the mapping busy).
    Partial(u64),
    /// Nothing was filled: the first page is already present.
    Exists,
    /// Nothing was filled: the mapping is changing (`EAGAIN` with a count of `-EAGAIN`); retry.
    Again,
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open userfaultfd after the `UFFDIO_API` handshake.
#[derive(Debug)]
pub struct UffdFd {
    fd: OwnedFd,
    features: u64,
    ioctls: u64,
}

impl UffdFd {
    /// Opens a non-blocking close-on-exec userfaultfd (syscall, then `/dev/userfaultfd`) and
    /// performs the API handshake requesting `features`.
    pub fn open(features: u64) -> io::Result<Self> {
        let fd = Self::raw_open()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
        Ok(Self {
            fd,
            features: api.features,
            ioctls: api.ioctls,
        })
    }

    /// Features this kernel offers (handshake on a throwaway descriptor requesting none).
    pub fn available_features() -> io::Result<u64> {
        Ok(Self::open(0)?.features)
    }

    fn raw_open() -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one int of flags and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            // SAFETY: `r` is a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let sys_err = io::Error::last_os_error();
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(|_| sys_err)?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and returns a new fd.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(r) })
    }

    /// Features granted by the handshake (all available ones, as the kernel reports them).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Ioctls the handshake reported.
    pub fn ioctls(&self) -> u64 {
        self.ioctls
    }

    /// `UFFDIO_REGISTER` of `[start, start+len)` with `mode` bits.
    pub fn register(&self, start: *mut u8, len: usize, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`. Registration
        // changes how faults in the range are served, not what memory Rust may touch.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })
    }

    /// `UFFDIO_UNREGISTER`; also wakes threads waiting on missing pages in the range.
    pub fn unregister(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) })
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in the range.
    pub fn wake(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) })
    }

    fn fill_result(r: libc::c_int, count: i64) -> io::Result<Fill> {
        if r >= 0 {
            return Ok(Fill::Done);
        }
        let err = io::Error::last_os_error();
        if count > 0 {
            return Ok(Fill::Partial(count as u64));
        }
        match err.raw_os_error() {
            Some(libc::EEXIST) => Ok(Fill::Exists),
            Some(libc::EAGAIN) => Ok(Fill::Again),
            _ => Err(err),
        }
    }

    /// `UFFDIO_COPY` of `len` bytes from `src` to registered `dst`.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes. `dst..dst+len` must be a page-aligned range of a
    /// registered mapping (the kernel checks the latter and fails with `EINVAL`/`ENOENT`).
    pub unsafe fn copy(
        &self,
        dst: *mut u8,
        src: *const u8,
        len: usize,
        wake: bool,
    ) -> io::Result<Fill> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: if wake { 0 } else { MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`; the caller guarantees
        // the source buffer.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        Self::fill_result(r, c.copy)
    }

    /// `UFFDIO_ZEROPAGE` of a registered, page-aligned range.
    pub fn zeropage(&self, start: *mut u8, len: usize, wake: bool) -> io::Result<Fill> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if wake { 0 } else { MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`; it only maps
        // zero pages where none are present, never changing bytes that exist.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
        Self::fill_result(r, z.zeropage)
    }

    /// `UFFDIO_WRITEPROTECT`: set (`protect`) or clear write protection of a range.
    pub fn writeprotect(&self, start: *mut u8, len: usize, protect: bool) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut w) })
    }

    /// Reads pending messages into `buf` without blocking; returns how many were read (0 when
    /// none is pending).
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is a writable array of `uffd_msg`-layout structs of `bytes` bytes; the
        // kernel writes whole messages only.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(r as usize / std::mem::size_of::<UffdMsg>())
    }
}

impl AsRawFd for UffdFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::os::fd::AsFd for UffdFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

/// `PAGEMAP_SCAN` ABI (`linux/fs.h`, Linux 6.7).
pub mod pagemap {
    /// `PAGE_IS_WRITTEN`: written since last write-protected.
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    /// `PAGE_IS_PFNZERO`: mapped to the shared zero page.
    pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
    /// `PM_SCAN_WP_MATCHING`: write-protect the matched pages.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// `PM_SCAN_CHECK_WPASYNC`: fail on pages without async write protection.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    /// `struct page_region`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PageRegion {
        /// Start address.
        pub start: u64,
        /// End address (exclusive).
        pub end: u64,
        /// `PAGE_IS_*` bits, masked by `return_mask`.
        pub categories: u64,
    }

    /// `struct pm_scan_arg`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PmScanArg {
        /// `sizeof(struct pm_scan_arg)`.
        pub size: u64,
        /// `PM_SCAN_*`.
        pub flags: u64,
        /// Start address.
        pub start: u64,
        /// End address (exclusive).
        pub end: u64,
        /// Out: where the walk stopped.
        pub walk_end: u64,
        /// Output `page_region` array.
        pub vec: u64,
        /// Its length.
        pub vec_len: u64,
        /// Page limit (0: none).
        pub max_pages: u64,
        /// Categories that match when 0.
        pub category_inverted: u64,
        /// All of these must match.
        pub category_mask: u64,
        /// At least one of these must match.
        pub category_anyof_mask: u64,
        /// Categories reported per region.
        pub return_mask: u64,
    }

    /// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
    pub const PAGEMAP_SCAN: u64 = super::ioc(
        super::IOC_READ | super::IOC_WRITE,
        b'f' as u64,
        16,
        core::mem::size_of::<PmScanArg>(),
    );
}
