//! RAM block images on disk, rebuilt from page records.
//!
//! [`Image`] owns one sparse file per RAM block (created when MEM_SIZE announces the blocks) and
//! applies, in stream order, what a destination would: PAGE, ZERO (fill byte), XBZRLE (against
//! the page as it is), COMPRESS_PAGE (zlib), multifd pages, and postcopy RAM_DISCARD (the
//! range reads as zero again). Pages go straight to the files with positioned writes, so memory
//! does not grow with the RAM size.

use anyhow::{bail, Context as _};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::multifd::MultifdItem;
use qmig_protocol::ram::{compress_page_decode, xbzrle_apply, RamBody};
use qmig_protocol::stream::Item;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One block's file.
pub struct Block {
    /// The block idstr.
    pub name: String,
    /// Used length.
    pub len: u64,
    /// The file.
    pub path: PathBuf,
    file: File,
    /// Pages ever written with data (ZERO records on other pages need no write).
    dirty: PageBitmap,
}

/// The blocks of one stream.
pub struct Image {
    dir: PathBuf,
    tps: u64,
    /// Blocks in MEM_SIZE order.
    pub blocks: Vec<Block>,
}

/// The file name of a block: the idstr with `/` replaced by `_` (and a leading one dropped).
pub fn file_name(idstr: &str) -> String {
    let s = idstr.strip_prefix('/').unwrap_or(idstr).replace('/', "_");
    if s.is_empty() || s == "." || s == ".." {
        format!("block_{}", s.len())
    } else {
        s
    }
}

impl Image {
    /// An image writing into `dir` with target pages of `tps` bytes.
    pub fn new(dir: &Path, tps: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        Ok(Image {
            dir: dir.to_path_buf(),
            tps,
            blocks: Vec::new(),
        })
    }

    fn block(&mut self, name: &[u8]) -> Option<&mut Block> {
        self.blocks.iter_mut().find(|b| b.name.as_bytes() == name)
    }

    /// Creates the block files announced by MEM_SIZE (sparse, all zero). A block longer than
    /// `Limits::max_block_bytes` (1 TiB) is refused before anything is sized by it.
    pub fn announce(&mut self, name: &[u8], len: u64) -> anyhow::Result<()> {
        if self.block(name).is_some() {
            return Ok(());
        }
        let cap = qmig_protocol::limits::Limits::DEFAULT.max_block_bytes;
        if len > cap {
            bail!(
                "block {} announces {len} bytes, more than the cap ({cap})",
                String::from_utf8_lossy(name)
            );
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let path = self.dir.join(file_name(&name));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("{}", path.display()))?;
        file.set_len(len)?;
        let dirty = PageBitmap::new(len.div_ceil(self.tps));
        self.blocks.push(Block {
            name,
            len,
            path,
            file,
            dirty,
        });
        Ok(())
    }

    /// Writes `data` at `addr` of block `name`.
    pub fn write(&mut self, name: &[u8], addr: u64, data: &[u8]) -> anyhow::Result<()> {
        let tps = self.tps;
        let Some(b) = self.block(name) else {
            bail!(
                "page for unannounced block {}",
                String::from_utf8_lossy(name)
            )
        };
        if addr
            .checked_add(data.len() as u64)
            .map_or(true, |e| e > b.len)
        {
            bail!("page at {addr:#x} outside block {}", b.name);
        }
        b.file.write_all_at(data, addr)?;
        b.dirty.set(addr / tps);
        Ok(())
    }

    /// Fills the page at `addr` with `fill` (a ZERO record).
    pub fn fill(&mut self, name: &[u8], addr: u64, fill: u8) -> anyhow::Result<()> {
        let tps = self.tps;
        if let Some(b) = self.block(name) {
            if fill == 0 && addr < b.len && !b.dirty.test(addr / tps) {
                return Ok(());
            }
        }
        let page = vec![fill; tps as usize];
        self.write(name, addr, &page)?;
        if fill == 0 {
            if let Some(b) = self.block(name) {
                b.dirty.clear(addr / tps);
            }
        }
        Ok(())
    }

    /// Reads the page at `addr`.
    fn read_page(&mut self, name: &[u8], addr: u64) -> anyhow::Result<Vec<u8>> {
        let mut page = vec![0u8; self.tps as usize];
        let Some(b) = self.block(name) else {
            bail!(
                "page for unannounced block {}",
                String::from_utf8_lossy(name)
            )
        };
        b.file.read_exact_at(&mut page, addr)?;
        Ok(page)
    }

    /// Zeroes `[start, start+len)` of a block (a postcopy discard).
    pub fn discard(&mut self, name: &[u8], start: u64, len: u64) -> anyhow::Result<()> {
        let tps = self.tps;
        let Some(b) = self.block(name) else {
            return Ok(());
        };
        let end = start.saturating_add(len).min(b.len);
        let mut a = start - start % tps;
        while a < end {
            if b.dirty.test(a / tps) {
                b.file.write_all_at(&vec![0u8; tps as usize], a)?;
                b.dirty.clear(a / tps);
            }
            a += tps;
        }
        Ok(())
    }

    /// Applies one main/recovery channel item (`block`: the record's block after CONTINUE,
    /// `at`: its offset, for error messages).
    pub fn apply(&mut self, item: &Item<'_>, block: Option<&[u8]>, at: u64) -> anyhow::Result<()> {
        match item {
            Item::Ram(rec) => {
                let addr = rec.addr;
                match (&rec.body, block) {
                    (RamBody::MemSize(list), _) => {
                        for b in list.iter() {
                            self.announce(b.name, b.used_length)?;
                        }
                    }
                    (RamBody::Page(p), Some(n)) => self.write(n, addr, p)?,
                    (RamBody::Zero { fill }, Some(n)) => self.fill(n, addr, *fill)?,
                    (RamBody::Xbzrle(delta), Some(n)) => {
                        let mut page = self.read_page(n, addr)?;
                        xbzrle_apply(delta, &mut page, at).map_err(|v| anyhow::anyhow!("{v}"))?;
                        self.write(n, addr, &page)?;
                    }
                    (RamBody::Compressed(body), Some(n)) => {
                        let mut page = vec![0u8; self.tps as usize];
                        compress_page_decode(body, &mut page, at)
                            .map_err(|v| anyhow::anyhow!("{v}"))?;
                        self.write(n, addr, &page)?;
                    }
                    _ => {}
                }
            }
            Item::Command(Command::RamDiscard(d)) => {
                for (s, l) in d.ranges() {
                    self.discard(d.name, s, l)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies one multifd item: pages with data, and (10.x) zero pages.
    pub fn apply_multifd(&mut self, item: &MultifdItem<'_>) -> anyhow::Result<()> {
        if let MultifdItem::Ram(p) = item {
            let name = p.ramblock();
            for (addr, data) in p.pages(self.tps as usize) {
                self.write(name, addr, data)?;
            }
            for addr in p.zero_offsets() {
                self.fill(name, addr, 0)?;
            }
        }
        Ok(())
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// sha256 of a file, read in chunks.
pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(super::record::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_file_names_stay_inside_the_directory() {
        assert_eq!(file_name("/rom@etc/acpi/tables"), "rom@etc_acpi_tables");
        assert_eq!(file_name("pc.bios"), "pc.bios");
        assert_eq!(file_name(".."), "block_2");
        assert_eq!(file_name("/"), "block_0");
    }

    #[test]
    fn zero_after_data_clears_and_discard_zeroes() {
        let dir = std::env::temp_dir().join(format!("qmig-cli-image-{}", std::process::id()));
        let mut img = Image::new(&dir, 4096).unwrap();
        img.announce(b"ram", 3 * 4096).unwrap();
        img.write(b"ram", 4096, &[7u8; 4096]).unwrap();
        img.write(b"ram", 8192, &[9u8; 4096]).unwrap();
        img.fill(b"ram", 4096, 0).unwrap();
        img.discard(b"ram", 8192, 4096).unwrap();
        assert!(img.write(b"ram", 3 * 4096, &[1u8; 4096]).is_err());
        let b = std::fs::read(dir.join("ram")).unwrap();
        assert_eq!(b, vec![0u8; 3 * 4096]);
        img.fill(b"ram", 0, 0x5a).unwrap();
        let b = std::fs::read(dir.join("ram")).unwrap();
        assert_eq!(&b[..4096], &[0x5a; 4096][..]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
