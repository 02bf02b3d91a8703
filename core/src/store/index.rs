//! The series index: one append-only table, shared by every process of a server,
//! that gives each label set of each family a global id. Value rows in every data
//! file are indexed by that id, so merging files is a sum by id.
//!
//! Appending takes an exclusive `flock` on the index file (cold path: once per
//! new label set and process); lookups go through a per-process mirror and take
//! no lock (the [`Mirror`], in `mirror.rs`). Each family holds at most
//! `family_cap` label sets; later ones share the family's `other` series.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};

use super::catalogue::Family;
use super::layout::{
    index_capacity, index_file_bytes, AppFamilySlot, AppTable, Entry, Mapped, APP_CODE_BASE,
    INDEX_MAGIC, LABEL_BYTES, MAX_BUCKETS, MAX_CAPACITY, MIN_CAPACITY, VERSION,
};

/// Label value used for every label of a family's overflow series.
pub const OTHER: &str = "other";

/// Most strings (label values; for app series, names and values) one key holds.
pub const MAX_KEY_VALUES: usize = 16;

/// The shared series index of one server.
#[derive(Debug)]
pub struct Index {
    pub(super) map: Mapped,
    path: PathBuf,
}

/// Label values of a family encoded as an index key: the family code, then each
/// value as a length byte and its bytes. At most `1 + LABEL_BYTES` bytes.
#[derive(Clone, Copy)]
pub struct Key {
    buf: [u8; 1 + LABEL_BYTES],
    len: usize,
    labels: u8,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl Key {
    /// Encodes `values` for `family`. Values too long for an entry are cut at a
    /// character boundary, the longest first, so the same input always gives the
    /// same key.
    pub fn new(family: Family, values: &[&str]) -> Key {
        debug_assert_eq!(values.len(), family.labels().len());
        Key::encode(family.code(), values)
    }

    /// Encodes the label pairs of a series of app family `family` (its index
    /// in the app table): each name, then its value.
    pub(super) fn app(family: usize, labels: &[(&str, &str)]) -> Key {
        let mut values = Vec::with_capacity(labels.len() * 2);
        for (k, v) in labels {
            values.push(*k);
            values.push(*v);
        }
        Key::encode(APP_CODE_BASE + family as u8, &values)
    }

    fn encode(code: u8, values: &[&str]) -> Key {
        let mut lens = [0usize; MAX_KEY_VALUES];
        let n = values.len().min(lens.len());
        for (len, v) in lens.iter_mut().zip(values) {
            *len = v.len().min(u8::MAX as usize);
        }
        // Shrink the longest value until everything fits.
        loop {
            let total: usize = lens[..n].iter().map(|l| l + 1).sum();
            if total <= LABEL_BYTES {
                break;
            }
            let Some((i, _)) = lens[..n].iter().enumerate().max_by_key(|(_, l)| **l) else {
                break;
            };
            let want = lens[i].saturating_sub(total - LABEL_BYTES);
            lens[i] = floor_char_boundary(values[i], want);
        }
        let mut key = Key {
            buf: [0; 1 + LABEL_BYTES],
            len: 1,
            labels: n as u8,
        };
        key.buf[0] = code;
        for (v, &l) in values.iter().zip(&lens[..n]) {
            key.buf[key.len] = l as u8;
            key.buf[key.len + 1..key.len + 1 + l].copy_from_slice(&v.as_bytes()[..l]);
            key.len += 1 + l;
        }
        key
    }

    /// The encoded bytes (family code first).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(super) fn family_code(&self) -> u8 {
        self.buf[0]
    }

    fn entry(&self) -> Entry {
        let mut data = [0u8; LABEL_BYTES];
        let body = &self.buf[1..self.len];
        data[..body.len()].copy_from_slice(body);
        Entry {
            family: self.buf[0],
            labels: self.labels,
            len: body.len() as u16,
            data,
        }
    }
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Decodes the label values of an index entry.
pub(super) fn entry_values(entry: &Entry) -> Vec<&str> {
    let mut out = Vec::with_capacity(entry.labels as usize);
    let data = &entry.data[..(entry.len as usize).min(LABEL_BYTES)];
    let mut at = 0;
    while at < data.len() && out.len() < entry.labels as usize {
        let l = data[at] as usize;
        let end = (at + 1 + l).min(data.len());
        out.push(std::str::from_utf8(&data[at + 1..end]).unwrap_or("invalid"));
        at = end;
    }
    out
}

/// Where a family's series and its overflow series are counted: the index
/// header for gpe's own families, the app table for the app's.
#[derive(Debug, Clone, Copy)]
struct FamilyCounts<'a> {
    /// Entry id + 1 of the family's `other` series, 0 until it exists.
    other_id: &'a AtomicU32,
    /// Series of the family (its `other` series not included).
    series: &'a AtomicU32,
    /// Whether `metrics_max_series` caps the family.
    capped: bool,
}

impl Index {
    /// Creates the index at `path` with room for `capacity` series, the given
    /// per-family cap and duration bucket bounds (seconds).
    ///
    /// # Errors
    /// File creation or mapping errors; `InvalidInput` for too many buckets
    /// or a capacity outside `MIN_CAPACITY..=MAX_CAPACITY`.
    pub fn create(
        path: &Path,
        capacity: usize,
        family_cap: u32,
        duration_buckets: &[f64],
    ) -> io::Result<Index> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a store holds {MIN_CAPACITY} to {MAX_CAPACITY} series, not {capacity}"),
            ));
        }
        if duration_buckets.len() > MAX_BUCKETS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many histogram buckets",
            ));
        }
        let map = Mapped::create(path, index_file_bytes(capacity))?;
        let h = map.index_header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.family_cap.store(family_cap, Ordering::Relaxed);
        h.duration_buckets_len
            .store(duration_buckets.len() as u32, Ordering::Relaxed);
        for (cell, b) in h.duration_buckets.iter().zip(duration_buckets) {
            cell.store(b.to_bits(), Ordering::Relaxed);
        }
        h.magic.store(INDEX_MAGIC, Ordering::Release);
        Ok(Index {
            map,
            path: path.to_owned(),
        })
    }

    /// Opens an existing index.
    ///
    /// # Safety
    /// See [`Mapped::open`]: the file must be a gpe index.
    ///
    /// # Errors
    /// Missing file, wrong size or magic.
    pub unsafe fn open(path: &Path) -> io::Result<Index> {
        let len = std::fs::metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
            .len();
        let Some(capacity) = index_capacity(len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {len} bytes: not a gpe index", path.display()),
            ));
        };
        // SAFETY: forwarded to the caller.
        let map = unsafe { Mapped::open(path, index_file_bytes(capacity))? };
        let h = map.index_header();
        if h.magic.load(Ordering::Acquire) != INDEX_MAGIC
            || h.version.load(Ordering::Relaxed) != VERSION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a gpe index of this version", path.display()),
            ));
        }
        Ok(Index {
            map,
            path: path.to_owned(),
        })
    }

    /// Series this index (and every data file of its store) has room for.
    pub fn capacity(&self) -> usize {
        self.map.entries()
    }

    /// Entries published so far.
    pub fn used(&self) -> u32 {
        self.map
            .index_header()
            .used
            .load(Ordering::Acquire)
            .min(self.capacity() as u32)
    }

    /// The family and label values of published entry `id`.
    pub fn describe(&self, id: u32) -> Option<(Family, Vec<&str>)> {
        if id >= self.used() {
            return None;
        }
        let e = self.map.entry(id);
        let family = Family::from_code(e.family)?;
        if e.labels as usize != family.labels().len() {
            return None;
        }
        Some((family, entry_values(e)))
    }

    /// The per-family series cap.
    pub fn family_cap(&self) -> u32 {
        self.map.index_header().family_cap.load(Ordering::Relaxed)
    }

    /// Duration bucket bounds in seconds.
    pub fn duration_buckets(&self) -> Vec<f64> {
        let h = self.map.index_header();
        let n = (h.duration_buckets_len.load(Ordering::Relaxed) as usize).min(MAX_BUCKETS);
        h.duration_buckets[..n]
            .iter()
            .map(|c| f64::from_bits(c.load(Ordering::Relaxed)))
            .collect()
    }

    /// The id of `family`'s overflow series, if it exists yet (and is a
    /// published entry).
    pub fn other_id(&self, family: Family) -> Option<u32> {
        let v = self.map.index_header().other_ids[family.code() as usize].load(Ordering::Acquire);
        v.checked_sub(1).filter(|id| *id < self.used())
    }

    /// Writes a copy of this index (as this process maps it) under its path,
    /// which must be free (the file was deleted), and switches to the copy.
    /// The old file is marked full, so that processes still mapping it drop
    /// new label sets instead of giving out ids the copy does not know.
    ///
    /// # Errors
    /// Creating, reserving or renaming the copy failed.
    pub fn recreate(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let copy = Mapped::create(&tmp, self.map.len())?;
        copy.copy_from(&self.map);
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.map
            .index_header()
            .used
            .store(u32::MAX, Ordering::Release);
        self.map = copy;
        Ok(())
    }

    /// Whether the mapped file is still whole and still the file at its path.
    pub fn intact(&self) -> bool {
        self.map.intact(&self.path)
    }

    /// Checks the header against the entries and puts right what a foreign
    /// write broke: the magic and version, a `used` count that disagrees with
    /// the entries written, overflow ids beyond it. Returns what was repaired
    /// (the master calls this; it holds the index mapped from the start).
    ///
    /// # Errors
    /// Taking the index lock failed.
    pub fn repair(&self) -> io::Result<Vec<String>> {
        let _lock = self.lock()?;
        let h = self.map.index_header();
        let mut fixed = Vec::new();
        if h.magic.load(Ordering::Relaxed) != INDEX_MAGIC
            || h.version.load(Ordering::Relaxed) != VERSION
        {
            h.version.store(VERSION, Ordering::Relaxed);
            h.magic.store(INDEX_MAGIC, Ordering::Release);
            fixed.push("its magic and version".to_owned());
        }
        let used = h.used.load(Ordering::Acquire);
        let written = |id: u32| {
            let e = self.map.entry(id);
            e.family != 0 || e.labels != 0 || e.len != 0
        };
        let capacity = self.capacity();
        let consistent = (used as usize) <= capacity
            && (used == 0 || written(used - 1))
            && (used as usize == capacity || !written(used));
        if !consistent {
            let real = (0..capacity as u32)
                .find(|id| !written(*id))
                .unwrap_or(capacity as u32);
            h.used.store(real, Ordering::Release);
            fixed.push(format!("`used` {used} (the entries say {real})"));
        }
        let used = h.used.load(Ordering::Acquire);
        for (fam, o) in h.other_ids.iter().enumerate() {
            let v = o.load(Ordering::Acquire);
            if v > used {
                o.store(0, Ordering::Release);
                fixed.push(format!("the overflow id of family {fam}"));
            }
        }
        Ok(fixed)
    }

    pub(super) fn family_full(&self, family: Family) -> bool {
        family.capped()
            && self.map.index_header().family_counts[family.code() as usize].load(Ordering::Acquire)
                >= self.family_cap()
    }

    /// Appends `key` unless it exists, returning its id; `Ok(None)` when the
    /// family is full (the caller then uses [`Index::other`]).
    pub(super) fn append(&self, key: &Key, other: bool) -> io::Result<Option<u32>> {
        let _lock = self.lock()?;
        let h = self.map.index_header();
        let fam = key.family_code() as usize;
        if fam >= h.family_counts.len() {
            return Err(io::Error::other("unknown family"));
        }
        let counts = FamilyCounts {
            other_id: &h.other_ids[fam],
            series: &h.family_counts[fam],
            capped: Family::from_code(key.family_code()).is_some_and(Family::capped),
        };
        self.append_locked(key, other, counts)
    }

    /// Appends `key` (or, with `other`, its family's overflow series) unless
    /// it exists, counting it in `counts`; `Ok(None)` when a capped family is
    /// full. The caller holds the index lock.
    fn append_locked(
        &self,
        key: &Key,
        other: bool,
        counts: FamilyCounts<'_>,
    ) -> io::Result<Option<u32>> {
        let h = self.map.index_header();
        let used = h.used.load(Ordering::Acquire);
        let capacity = self.capacity();
        if used as usize > capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the series index says {used} entries, beyond its {capacity}"),
            ));
        }
        if other {
            if let Some(id) = counts
                .other_id
                .load(Ordering::Acquire)
                .checked_sub(1)
                .filter(|id| *id < used)
            {
                return Ok(Some(id));
            }
        } else {
            for id in 0..used {
                let e = self.map.entry(id);
                if e.family == key.family_code() && e_bytes(e) == &key.as_bytes()[1..] {
                    return Ok(Some(id));
                }
            }
            if counts.capped
                && counts.series.load(Ordering::Acquire) >= h.family_cap.load(Ordering::Relaxed)
            {
                return Ok(None);
            }
        }
        if used as usize >= capacity {
            return Err(io::Error::other("series index is full"));
        }
        // SAFETY: we hold the exclusive lock and `used` is the next free entry.
        unsafe { self.map.write_entry(used, &key.entry()) };
        h.used.store(used + 1, Ordering::Release);
        if other {
            counts.other_id.store(used + 1, Ordering::Release);
        } else {
            counts.series.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Some(used))
    }

    /// The id of `family`'s overflow series, creating it if needed.
    ///
    /// # Errors
    /// Locking errors or a full index.
    pub fn other(&self, family: Family) -> io::Result<u32> {
        if let Some(id) = self.other_id(family) {
            return Ok(id);
        }
        let values = vec![OTHER; family.labels().len()];
        let key = Key::new(family, &values);
        self.append(&key, true)?
            .ok_or_else(|| io::Error::other("overflow series refused"))
    }

    /// The app-family table.
    pub(super) fn app_table(&self) -> &AppTable {
        self.map.app_table()
    }

    /// App family `i` of the table, if registered (its kind published).
    pub(super) fn app_slot(&self, i: usize) -> Option<&AppFamilySlot> {
        let t = self.map.app_table();
        let slot = t.families.get(i)?;
        (slot.kind.load(Ordering::Acquire) != 0).then_some(slot)
    }

    /// The app family of published entry `id` and its label pairs, if it is
    /// an app series.
    pub(super) fn describe_app(&self, id: u32) -> Option<(usize, Vec<(&str, &str)>)> {
        if id >= self.used() {
            return None;
        }
        let e = self.map.entry(id);
        let fam = e.family.checked_sub(APP_CODE_BASE)? as usize;
        self.app_slot(fam)?;
        let values = entry_values(e);
        if values.len() % 2 != 0 {
            return None;
        }
        Some((
            fam,
            values.chunks(2).map(|p| (p[0], p[1])).collect::<Vec<_>>(),
        ))
    }

    /// The gpe family of published entry `id`, if it is one of gpe's.
    pub(super) fn family_of(&self, id: u32) -> Option<Family> {
        if id >= self.used() {
            return None;
        }
        Family::from_code(self.map.entry(id).family)
    }

    /// The app family of entry `id`, if it is an app series.
    pub(super) fn app_family_of(&self, id: u32) -> Option<usize> {
        if id >= self.used() {
            return None;
        }
        let fam = self.map.entry(id).family.checked_sub(APP_CODE_BASE)? as usize;
        self.app_slot(fam).map(|_| fam)
    }

    /// The id of app family `fam`'s overflow series, if it exists yet.
    pub(super) fn app_other_id(&self, fam: usize) -> Option<u32> {
        let slot = self.map.app_table().families.get(fam)?;
        let v = slot.other_id.load(Ordering::Acquire);
        v.checked_sub(1).filter(|id| *id < self.used())
    }

    /// Appends an app series (`key` made by [`Key::app`]) unless it exists;
    /// `Ok(None)` when its family reached the cap. With `other`, appends the
    /// family's overflow series (once).
    pub(super) fn append_app(&self, key: &Key, fam: usize, other: bool) -> io::Result<Option<u32>> {
        let _lock = self.lock()?;
        let slot = self
            .map
            .app_table()
            .families
            .get(fam)
            .ok_or_else(|| io::Error::other("unknown app family"))?;
        let counts = FamilyCounts {
            other_id: &slot.other_id,
            series: &slot.series,
            capped: true,
        };
        self.append_locked(key, other, counts)
    }

    /// Runs `f` under the index lock (the app table's writers take it too).
    pub(super) fn locked<T>(&self, f: impl FnOnce(&AppTable) -> T) -> io::Result<T> {
        let _lock = self.lock()?;
        Ok(f(self.map.app_table()))
    }

    fn lock(&self) -> io::Result<Flock<File>> {
        // A fresh open file description per lock: flock does not exclude holders of
        // the same description, and descriptions are shared across fork.
        let file = File::open(&self.path)?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))
    }
}

pub(super) fn e_bytes(e: &Entry) -> &[u8] {
    &e.data[..(e.len as usize).min(LABEL_BYTES)]
}

pub use super::mirror::{Mirror, Resolved};

#[cfg(test)]
mod tests {
    use super::*;

    fn index(cap: u32) -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::create(&dir.path().join("index"), 1024, cap, &[0.1, 1.0]).unwrap();
        (dir, idx)
    }

    #[test]
    fn same_labels_same_id_across_mirrors() {
        let (dir, idx) = index(10);
        // SAFETY: the file is the index just created.
        let other_view = unsafe { Index::open(&dir.path().join("index")) }.unwrap();
        let mut a = Mirror::default();
        let mut b = Mirror::default();
        let k = Key::new(Family::HttpDuration, &["GET", "/x"]);
        let ia = a.resolve(&idx, &k).unwrap();
        let ib = b.resolve(&other_view, &k).unwrap();
        assert_eq!(ia, ib);
        assert_eq!(ia, Resolved::Own(0));
        let k2 = Key::new(Family::HttpDuration, &["GET", "/y"]);
        assert_eq!(b.resolve(&other_view, &k2).unwrap(), Resolved::Own(1));
        assert_eq!(idx.describe(1).unwrap().1, vec!["GET", "/y"]);
        assert_eq!(idx.duration_buckets(), vec![0.1, 1.0]);
    }

    #[test]
    fn cap_collapses_into_other() {
        let (_dir, idx) = index(3);
        let mut m = Mirror::default();
        let mut own = 0;
        let mut other = None;
        for i in 0..10 {
            let route = format!("/r{i}");
            let r = m
                .resolve(&idx, &Key::new(Family::HttpDuration, &["GET", &route]))
                .unwrap();
            match r {
                Resolved::Own(_) => own += 1,
                Resolved::Other(id) => {
                    assert!(other.is_none() || other == Some(id));
                    other = Some(id);
                }
            }
        }
        assert_eq!(own, 3);
        let id = other.unwrap();
        assert_eq!(idx.describe(id).unwrap().1, vec![OTHER, OTHER]);
        assert_eq!(idx.used(), 4);
    }

    #[test]
    fn long_values_are_cut_at_char_boundaries_deterministically() {
        let long = "é".repeat(200);
        let k1 = Key::new(Family::HttpRequests, &["GET", &long, "200"]);
        let k2 = Key::new(Family::HttpRequests, &["GET", &long, "200"]);
        assert_eq!(k1.as_bytes(), k2.as_bytes());
        assert!(k1.as_bytes().len() <= 1 + LABEL_BYTES);
        let e = k1.entry();
        let vals = entry_values(&e);
        assert_eq!(vals[0], "GET");
        assert_eq!(vals[2], "200");
        assert!(vals[1].chars().all(|c| c == 'é'));
    }
}
