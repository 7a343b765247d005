//! qtest client: reads and writes guest-physical memory of a QEMU started
//! with `-qtest unix:SOCK`. Line protocol: one command per line, answered by
//! `OK [value]` or `FAIL ...`; asynchronous `IRQ ...` lines are skipped.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Largest single qtest reply line accepted (a base64 of 16 MiB plus slack).
const MAX_LINE: usize = 24 << 20;
/// Bytes moved per `b64write`/`b64read` command.
const CHUNK: usize = 1 << 20;

/// A connected qtest session.
pub struct Qtest {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Qtest {
    /// Connects to the qtest socket, retrying while QEMU is still starting.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(Qtest {
                        stream,
                        buf: Vec::new(),
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one command line and returns the text after `OK`.
    pub fn command(&mut self, line: &str) -> io::Result<String> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\n")?;
        loop {
            let reply = self.read_line()?;
            if reply.starts_with("IRQ") {
                continue;
            }
            if let Some(rest) = reply.strip_prefix("OK") {
                return Ok(rest.trim().to_string());
            }
            return Err(io::Error::other(format!(
                "qtest `{}`: {reply}",
                short(line)
            )));
        }
    }

    /// `writeq ADDR VALUE`.
    pub fn writeq(&mut self, addr: u64, value: u64) -> io::Result<()> {
        self.command(&format!("writeq {addr:#x} {value:#x}"))
            .map(drop)
    }

    /// `readq ADDR`.
    pub fn readq(&mut self, addr: u64) -> io::Result<u64> {
        let v = self.command(&format!("readq {addr:#x}"))?;
        parse_hex(&v)
    }

    /// `write ADDR SIZE 0xHEX`.
    pub fn write_hex(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        let hex = super::pattern::hex(data);
        self.command(&format!("write {addr:#x} {:#x} 0x{hex}", data.len()))
            .map(drop)
    }

    /// `read ADDR SIZE` (answer `OK 0xHEX`).
    pub fn read_hex(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let v = self.command(&format!("read {addr:#x} {len:#x}"))?;
        let h = v.strip_prefix("0x").unwrap_or(&v);
        if h.len() != len * 2 {
            return Err(io::Error::other(format!(
                "qtest read: {} hex digits for {len} bytes",
                h.len()
            )));
        }
        (0..len)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(io::Error::other))
            .collect()
    }

    /// Bulk write with `b64write`, in 1 MiB commands.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        for (i, c) in data.chunks(CHUNK).enumerate() {
            let a = addr + (i * CHUNK) as u64;
            self.command(&format!("b64write {a:#x} {:#x} {}", c.len(), B64.encode(c)))?;
        }
        Ok(())
    }

    /// Bulk read with `b64read`, in 1 MiB commands.
    pub fn read(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(CHUNK);
            let a = addr + out.len() as u64;
            let v = self.command(&format!("b64read {a:#x} {n:#x}"))?;
            let bytes = B64.decode(v.as_bytes()).map_err(io::Error::other)?;
            if bytes.len() != n {
                return Err(io::Error::other(format!(
                    "b64read gave {} of {n} bytes",
                    bytes.len()
                )));
            }
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    fn read_line(&mut self) -> io::Result<String> {
        // Bytes of `buf` already known to hold no newline.
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=scanned + i).collect();
                return Ok(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::other("qtest reply line too long"));
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn short(line: &str) -> &str {
    &line[..line.len().min(60)]
}

fn parse_hex(v: &str) -> io::Result<u64> {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(io::Error::other)
}
