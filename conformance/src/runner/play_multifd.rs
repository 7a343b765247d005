//! The played destination's multifd connections.
//!
//! This module owns [`MultifdReceiver`]: it accepts the extra connections a source with the
//! `multifd` capability opens after the main one, reads each on its own thread (the source's
//! main channel waits for its multifd threads, so they must be read while the main channel
//! is), decodes every byte with the protocol crate's `MultifdDecoder` (a violation fails the
//! case with its rule and offset), and hands back the pages (block, offset, data or zero).

use std::io::Read;
use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmig_protocol::limits::Limits;
use qmig_protocol::multifd::{MultifdDecoder, MultifdItem};
use qmig_protocol::{Profile, WireError};

/// One page from a multifd connection: block name, byte offset, data (`None`: a zero page).
pub type MultifdPage = (String, u64, Option<Vec<u8>>);

/// Target page size.
const TPS: usize = 4096;

/// The receiver of `n` multifd connections.
pub struct MultifdReceiver {
    handle: JoinHandle<Result<Vec<MultifdPage>, String>>,
}

impl MultifdReceiver {
    /// Accepts `n` connections on `l` (after the main one) on a thread and reads them.
    pub fn start(l: TcpListener, n: usize, profile: Profile) -> MultifdReceiver {
        let handle = std::thread::spawn(move || {
            l.set_nonblocking(false).map_err(|e| e.to_string())?;
            let mut readers = Vec::new();
            for k in 0..n {
                let (sock, _) = accept(&l, k)?;
                readers.push(std::thread::spawn(move || {
                    read_connection(sock, k, profile)
                }));
            }
            let mut pages = Vec::new();
            for r in readers {
                pages.extend(
                    r.join()
                        .map_err(|_| "multifd reader panicked".to_string())??,
                );
            }
            Ok(pages)
        });
        MultifdReceiver { handle }
    }

    /// Waits for every connection to end; the pages, in arrival order per connection.
    pub fn finish(self) -> Result<Vec<MultifdPage>, String> {
        self.handle
            .join()
            .map_err(|_| "multifd receiver panicked".to_string())?
    }
}

fn accept(l: &TcpListener, k: usize) -> Result<(std::net::TcpStream, ()), String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok((s, ()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!("multifd connection {} never came", k + 1));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn read_connection(
    mut sock: std::net::TcpStream,
    k: usize,
    profile: Profile,
) -> Result<Vec<MultifdPage>, String> {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(120)));
    let mut dec = MultifdDecoder::new(profile, Limits::DEFAULT);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut pages = Vec::new();
    loop {
        let n = match sock.read(&mut chunk) {
            Ok(n) => n,
            Err(e) => return Err(format!("multifd connection {}: {e}", k + 1)),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        loop {
            match dec.decode(&buf[pos..]) {
                Ok((item, used)) => {
                    if let MultifdItem::Ram(p) = &item {
                        let name = String::from_utf8_lossy(p.ramblock()).into_owned();
                        for (addr, data) in p.pages(TPS) {
                            pages.push((name.clone(), addr, Some(data.to_vec())));
                        }
                        for addr in p.zero_offsets() {
                            pages.push((name.clone(), addr, None));
                        }
                    }
                    pos += used;
                }
                Err(WireError::Incomplete { .. }) => break,
                Err(WireError::Invalid(v)) => {
                    return Err(format!(
                        "multifd connection {}: {} at offset {} (value {:#x})",
                        k + 1,
                        v.rule.id(),
                        v.offset,
                        v.value
                    ))
                }
            }
        }
        buf.drain(..pos);
        if n == 0 {
            if !buf.is_empty() {
                return Err(format!(
                    "multifd connection {} ends inside a packet at offset {} ({} bytes left)",
                    k + 1,
                    dec.offset(),
                    buf.len()
                ));
            }
            return Ok(pages);
        }
    }
}
