//! A store file mapped shared into this process ([`Mapped`]): the store's
//! only `unsafe` code. It maps a file, views the mapping as the `repr(C)`
//! structs of [`layout`](super::layout), and keeps the SIGBUS guard that
//! turns a page of a mapping whose file was cut short (by another program)
//! into private zeroes instead of killing the process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memmap2::MmapRaw;

use super::layout::*;

/// A store file mapped shared into this process.
#[derive(Debug)]
pub(super) struct Mapped {
    map: MmapRaw,
    /// The open file, to see whether it was cut short or replaced.
    file: File,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        guard::unregister(self.map.as_ptr() as usize);
    }
}

impl Mapped {
    /// Creates `path` (which must not exist) at `len` zeroed bytes, all of them
    /// backed by the filesystem, and maps it. A filesystem without room fails
    /// here (the file is removed) instead of at a later write.
    ///
    /// # Errors
    /// Any error from creating, reserving or mapping the file.
    pub fn create(path: &Path, len: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(e) = nix::fcntl::posix_fallocate(file.as_fd(), 0, len as libc::off_t) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot reserve {len} bytes for {}: {e}", path.display()),
            ));
        }
        Self::map(file, len)
    }

    /// Whether the mapped file is still whole: its full size, and still the
    /// file at `path`.
    pub fn intact(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(mine), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        mine.len() >= self.map.len() as u64
            && mine.ino() == there.ino()
            && mine.dev() == there.dev()
    }

    /// The mapped file's metadata (`fstat`).
    pub fn file_metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Whether `path` still names the mapped file (whatever its size).
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(mine), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        mine.ino() == there.ino() && mine.dev() == there.dev()
    }

    /// Maps an existing store file of exactly `len` bytes.
    ///
    /// # Safety
    /// Every process that maps this file must access it only through this
    /// module's views (atomics and published, never-rewritten index entries).
    /// Files created by [`Mapped::create`] and written by gpe satisfy this.
    ///
    /// # Errors
    /// Not found, wrong size, or any mapping error.
    pub unsafe fn open(path: &Path, len: usize) -> io::Result<Self> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(named)?;
        let actual = file.metadata().map_err(named)?.len();
        if actual != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {actual} bytes, expected {len}: not a gpe store file of this version",
                    path.display()
                ),
            ));
        }
        Self::map(file, len).map_err(named)
    }

    fn map(file: File, len: usize) -> io::Result<Self> {
        let map = MmapRaw::map_raw(&file)?;
        if map.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "store file shorter than its layout",
            ));
        }
        guard::register(map.as_ptr() as usize, map.len());
        Ok(Self { map, file })
    }

    /// Copies every byte of `src` (a mapping of the same length) into this
    /// mapping, one 8-byte word at a time.
    pub fn copy_from(&self, src: &Mapped) {
        let words = self.map.len().min(src.map.len()) / 8;
        for i in 0..words {
            // SAFETY: `i * 8 + 8` is within both mappings (bounded above), both
            // are page-aligned so every word is 8-byte aligned, and the store's
            // bytes are only ever accessed as atomics or as published, never
            // rewritten entries, so an atomic view of any word is sound.
            unsafe {
                let from = &*(src.map.as_ptr().add(i * 8) as *const AtomicU64);
                let to = &*(self.map.as_ptr().add(i * 8) as *const AtomicU64);
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Sets every byte of the mapping to zero.
    pub fn zero(&self) {
        for i in 0..self.map.len() / 8 {
            // SAFETY: as in `copy_from`: in bounds, aligned, atomics only.
            unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
                .store(0, Ordering::Relaxed);
        }
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Value rows of a data file: how many series it has room for.
    pub fn rows(&self) -> usize {
        self.map.len().saturating_sub(ROWS_OFFSET) / std::mem::size_of::<Row>()
    }

    /// Entries of an index file: how many series it has room for.
    pub fn entries(&self) -> usize {
        self.map.len().saturating_sub(ENTRIES_OFFSET) / std::mem::size_of::<Entry>()
    }

    /// The data-file header.
    ///
    /// The mapping must be a data file (at least [`HEADER_BYTES`] long).
    pub fn header(&self) -> &Header {
        assert!(self.map.len() >= HEADER_BYTES);
        // SAFETY: the mapping is page-aligned and at least HEADER_BYTES long (checked
        // above), `Header` is `repr(C)` of atomics only, for which every bit pattern
        // (including the zeroes of a new file) is valid, and all concurrent access from
        // other processes goes through the same atomics. The reference lives no longer
        // than `self`, which owns the mapping.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The value row of series `id` in a data file.
    ///
    /// # Panics
    /// If `id` is not below [`Mapped::rows`]: callers bound every id they
    /// take from a file (see `Index::used`, `Index::other_id`), and every file
    /// of a store has as many rows as its index has entries.
    pub fn row(&self, id: u32) -> &Row {
        let id = id as usize;
        assert!(id < self.rows());
        // SAFETY: the row lies inside the mapping (bounds checked above), rows are
        // 8-byte aligned (ROWS_OFFSET and the row size are multiples of 8 and the
        // mapping is page-aligned), and a row is an array of atomics, valid for any bits.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(ROWS_OFFSET + id * std::mem::size_of::<Row>()) as *const Row)
        }
    }

    /// The value rows of series `0..n` in a data file, as one slice (the
    /// merge reads them in one pass instead of one bounds check per row).
    ///
    /// # Panics
    /// If `n` is above [`Mapped::rows`] (as [`Mapped::row`]).
    pub fn rows_upto(&self, n: u32) -> &[Row] {
        let n = n as usize;
        assert!(n <= self.rows());
        // SAFETY: the `n` rows lie inside the mapping (bounds checked above),
        // start 8-byte aligned (as in `row`) and follow each other without
        // padding (`Row` is an array of `u64` atomics); every bit pattern is
        // a valid row, and other processes touch them only through the same
        // atomics. The slice lives no longer than `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(ROWS_OFFSET) as *const Row, n) }
    }

    /// The in-flight table of a data file.
    pub fn in_flight(&self) -> &InFlightTable {
        assert!(self.map.len() >= ROWS_OFFSET);
        // SAFETY: the table lies inside the mapping (checked above), at an
        // 8-byte aligned offset of a page-aligned mapping, and is `repr(C)`
        // atomics only, valid for any bits (zeroes: every entry free).
        unsafe { &*(self.map.as_ptr().add(IN_FLIGHT_OFFSET) as *const InFlightTable) }
    }

    /// Exemplar row `slot` of a data file.
    ///
    /// # Panics
    /// If `slot` is not below [`EXEMPLAR_SLOTS`].
    pub fn exemplars(&self, slot: usize) -> &ExemplarRow {
        assert!(slot < EXEMPLAR_SLOTS && self.map.len() >= ROWS_OFFSET);
        // SAFETY: the row lies inside the mapping (bounds checked above), at an
        // 8-byte aligned offset (EXEMPLARS_OFFSET and the row size are multiples
        // of 8, the mapping is page-aligned), and it is atomics only, valid for
        // any bits; other processes touch it only through the same atomics.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(EXEMPLARS_OFFSET + slot * std::mem::size_of::<ExemplarRow>())
                as *const ExemplarRow)
        }
    }

    /// The app-family table of an index file.
    pub fn app_table(&self) -> &AppTable {
        assert!(self.map.len() >= ENTRIES_OFFSET);
        // SAFETY: as for `index_header`: the table lies inside the mapping
        // (checked), 8-byte aligned (APP_TABLE_OFFSET is a multiple of 8 from a
        // page-aligned start), and atomics only.
        unsafe { &*(self.map.as_ptr().add(APP_TABLE_OFFSET) as *const AppTable) }
    }

    /// The index header. The mapping must be an index file.
    pub fn index_header(&self) -> &IndexHeader {
        assert!(self.map.len() >= INDEX_HEADER_BYTES);
        // SAFETY: as for `header`: aligned, in bounds, atomics only.
        unsafe { &*(self.map.as_ptr() as *const IndexHeader) }
    }

    /// Entry `id` of an index file. Only entries below the published `used`
    /// count may be read; they are never written again.
    pub fn entry(&self, id: u32) -> &Entry {
        let id = id as usize;
        assert!(id < self.entries());
        // SAFETY: in bounds (checked), `Entry` is plain bytes (valid for any bits) and
        // align 2 at a 128-byte stride from an 8-byte aligned offset. Callers read an entry
        // only after an acquire load of `used` covers it; its writer published it with
        // a release store after writing it and never writes it again.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(ENTRIES_OFFSET + id * std::mem::size_of::<Entry>())
                as *const Entry)
        }
    }

    /// Writes entry `id` of an index file before it is published.
    ///
    /// # Safety
    /// The caller holds the index's exclusive lock and `id` equals the current
    /// `used` count, so no process reads or writes this entry concurrently.
    pub unsafe fn write_entry(&self, id: u32, entry: &Entry) {
        let id = id as usize;
        assert!(id < self.entries());
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe {
            let dst = self
                .map
                .as_mut_ptr()
                .add(ENTRIES_OFFSET + id * std::mem::size_of::<Entry>())
                as *mut Entry;
            std::ptr::write(
                dst,
                Entry {
                    family: entry.family,
                    labels: entry.labels,
                    len: entry.len,
                    data: entry.data,
                },
            );
        }
    }
}

/// The SIGBUS guard: a fault inside a store mapping (its file was truncated
/// under it, so the page has no backing) maps a private zero page over the
/// faulting page and lets the access run again. Faults anywhere else go to the
/// handler that was installed before, or the default one.
mod guard {
    use super::*;

    /// Mappings guarded at once; beyond it a mapping is simply unguarded.
    const SLOTS: usize = 1024;
    #[allow(clippy::declare_interior_mutable_const)]
    const FREE: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
    static RANGES: [(AtomicUsize, AtomicUsize); SLOTS] = [FREE; SLOTS];
    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    /// Pages replaced so far in this process.
    pub(in crate::store) static FAULTS: AtomicU64 = AtomicU64::new(0);
    static PREVIOUS: std::sync::OnceLock<Previous> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Once = std::sync::Once::new();

    struct Previous(libc::sigaction);
    // SAFETY: a plain C struct (a handler address, a mask, flags) written once
    // before the handler can run and only read after.
    unsafe impl Sync for Previous {}
    // SAFETY: as above.
    unsafe impl Send for Previous {}

    pub(super) fn register(start: usize, len: usize) {
        INSTALL.call_once(install);
        for (s, l) in &RANGES {
            if s.load(Ordering::Relaxed) == 0 {
                l.store(len, Ordering::Release);
                if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
    }

    pub(super) fn unregister(start: usize) {
        for (s, _) in &RANGES {
            if s.compare_exchange(start, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    fn install() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: `sigaction` is plain data, valid zeroed; the handler below
        // only reads atomics and calls mmap and sigaction (plain system calls).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                let _ = PREVIOUS.set(Previous(old));
            }
        }
    }

    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for (s, l) in &RANGES {
            let start = s.load(Ordering::Acquire);
            let len = l.load(Ordering::Acquire);
            if start != 0 && addr >= start && addr < start + len {
                let at = addr & !(page - 1);
                // SAFETY: `at..at + page` lies inside a store mapping this
                // process owns (registered above, page-aligned start and
                // length); replacing it with private zeroes changes only what
                // this process sees of a file that no longer backs it.
                let p = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    FAULTS.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        // Not ours: put the previous handler back; the access faults again
        // under it.
        // SAFETY: restores a sigaction read from the kernel (or the default).
        unsafe {
            match PREVIOUS.get() {
                Some(Previous(old)) => libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()),
                None => {
                    libc::signal(libc::SIGBUS, libc::SIG_DFL);
                    0
                }
            };
        }
    }
}

/// Asks the CPU to start loading `row` into its caches: its first cache
/// line, or both (`whole`: a histogram's sixteen cells). A hint only; on
/// other architectures it does nothing.
///
/// The merge calls it some rows ahead of the one it sums. The hardware
/// prefetcher stops at each 4 KiB page of a file, so that a 256-worker merge
/// otherwise waits on memory at every page it enters.
#[inline(always)]
pub(super) fn prefetch(row: &Row, whole: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = row.as_ptr().cast::<i8>();
        // SAFETY: `_mm_prefetch` needs only SSE, which every x86_64 target
        // has; a prefetch reads nothing into the program and never faults,
        // and both addresses lie inside `row` (128 bytes), a live reference.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            if whole {
                _mm_prefetch::<_MM_HINT_T0>(p.add(64));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, whole);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_file_is_fully_backed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let _m = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            blocks * 512 >= data_file_bytes(DEFAULT_CAPACITY) as u64,
            "{blocks} blocks"
        );
    }

    #[test]
    fn a_truncated_file_reads_as_zeroes_instead_of_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let m = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        m.header().requests.store(9, Ordering::Relaxed);
        m.row(100)[3].store(5, Ordering::Relaxed);
        assert!(m.intact(&path));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(!m.intact(&path));
        let before = guard::FAULTS.load(Ordering::Relaxed);
        assert_eq!(m.header().requests.load(Ordering::Relaxed), 0);
        assert_eq!(m.row(100)[3].load(Ordering::Relaxed), 0);
        m.row(100)[3].store(1, Ordering::Relaxed);
        assert_eq!(m.row(100)[3].load(Ordering::Relaxed), 1);
        assert_eq!(guard::FAULTS.load(Ordering::Relaxed) - before, 2);
    }

    #[test]
    fn a_copy_holds_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mapped::create(&dir.path().join("a"), data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let b = Mapped::create(&dir.path().join("b"), data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        a.header().epoch.store(4, Ordering::Relaxed);
        a.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].store(11, Ordering::Relaxed);
        b.copy_from(&a);
        assert_eq!(b.header().epoch.load(Ordering::Relaxed), 4);
        assert_eq!(
            b.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].load(Ordering::Relaxed),
            11
        );
    }

    #[test]
    fn a_file_that_cannot_be_backed_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let err = Mapped::create(&path, usize::MAX / 4).unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn created_file_has_fixed_size_and_shared_atomics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let a = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        // SAFETY: the file was just created by this module.
        let b = unsafe { Mapped::open(&path, data_file_bytes(DEFAULT_CAPACITY)) }.unwrap();
        a.header().requests.fetch_add(3, Ordering::Relaxed);
        a.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].fetch_add(7, Ordering::Relaxed);
        assert_eq!(b.header().requests.load(Ordering::Relaxed), 3);
        assert_eq!(
            b.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].load(Ordering::Relaxed),
            7
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            data_file_bytes(DEFAULT_CAPACITY) as u64
        );
        // The slice of every row is the rows one by one.
        let all = b.rows_upto(DEFAULT_CAPACITY as u32);
        assert_eq!(all.len(), DEFAULT_CAPACITY);
        assert!(std::ptr::eq(
            &all[DEFAULT_CAPACITY - 1],
            b.row(DEFAULT_CAPACITY as u32 - 1)
        ));
        assert_eq!(
            all[DEFAULT_CAPACITY - 1][CELLS - 1].load(Ordering::Relaxed),
            7
        );
        assert!(b.rows_upto(0).is_empty());
    }

    #[test]
    #[should_panic]
    fn rows_beyond_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mapped::create(&dir.path().join("w"), data_file_bytes(MIN_CAPACITY)).unwrap();
        a.rows_upto(MIN_CAPACITY as u32 + 1);
    }

    #[test]
    fn exemplar_rows_and_app_table_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("w");
        let a = Mapped::create(&d, data_file_bytes(MIN_CAPACITY)).unwrap();
        // SAFETY: the file was just created by this module.
        let b = unsafe { Mapped::open(&d, data_file_bytes(MIN_CAPACITY)) }.unwrap();
        a.exemplars(EXEMPLAR_SLOTS - 1)[EXEMPLAR_BUCKETS - 1]
            .at_ns
            .store(9, Ordering::Relaxed);
        assert_eq!(
            b.exemplars(EXEMPLAR_SLOTS - 1)[EXEMPLAR_BUCKETS - 1]
                .at_ns
                .load(Ordering::Relaxed),
            9
        );
        let i = dir.path().join("i");
        let a = Mapped::create(&i, index_file_bytes(MIN_CAPACITY)).unwrap();
        // SAFETY: as above.
        let b = unsafe { Mapped::open(&i, index_file_bytes(MIN_CAPACITY)) }.unwrap();
        a.app_table().families[MAX_APP_FAMILIES - 1].unit[1].store(3, Ordering::Relaxed);
        assert_eq!(
            b.app_table().families[MAX_APP_FAMILIES - 1].unit[1].load(Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn open_refuses_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"short").unwrap();
        // SAFETY: the open fails before mapping.
        let err = unsafe { Mapped::open(&path, data_file_bytes(DEFAULT_CAPACITY)) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn index_entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let m = Mapped::create(&path, index_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let mut e = Entry {
            family: 3,
            labels: 1,
            len: 2,
            data: [0; LABEL_BYTES],
        };
        e.data[0] = 1;
        e.data[1] = b'x';
        // SAFETY: single process, nothing published yet.
        unsafe { m.write_entry(5, &e) };
        assert_eq!(m.entry(5).family, 3);
        assert_eq!(&m.entry(5).data[..2], &[1, b'x']);
    }
}
