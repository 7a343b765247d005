//! The hugetlbfs that backs a QEMU RAM block of 2 MiB pages (the huge-page synthetic cases,
//! `{MEM_BACKEND}`, and the live huge-page postcopy test): where it is mounted, how many of
//! its pages are free, and the QEMU arguments that put a block on it.

/// Where the hugetlbfs is mounted (`.ci/run` mounts it and reserves its pages).
pub const HUGETLBFS: &str = "/dev/hugepages";

/// Free 2 MiB pages of the hugetlbfs at [`HUGETLBFS`]; 0 when none is mounted there.
pub fn hugetlbfs_free_pages() -> u64 {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(HUGETLBFS) && l.contains(" hugetlbfs "));
    let free = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    if mounted {
        free
    } else {
        0
    }
}

/// QEMU arguments that make the machine's RAM a hugetlbfs file of `size` (QEMU syntax: bytes
/// or `16M`) whose RAMBlock is named `block`: a shared `memory-backend-file` with id `block`
/// used as the machine's memory backend.
pub fn hugetlbfs_backend_args(block: &str, size: &str) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-file,id={block},size={size},mem-path={HUGETLBFS},share=on"),
        "-machine".into(),
        format!("memory-backend={block}"),
    ]
}
