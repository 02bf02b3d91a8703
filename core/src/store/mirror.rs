//! The per-process mirror of the series index ([`Mirror`]): lookups without
//! a lock, and the appends (under the index's lock) of label sets it has not
//! seen.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::sync::atomic::Ordering;

use hashbrown::HashMap;

use super::catalogue::Family;
use super::index::{e_bytes, Index, Key, OTHER};
use super::layout::MAX_APP_FAMILIES;

/// Outcome of resolving a label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The label set's own series.
    Own(u32),
    /// The family is full: the `other` series.
    Other(u32),
}

impl Resolved {
    /// The row id to update.
    pub fn id(self) -> u32 {
        match self {
            Resolved::Own(id) | Resolved::Other(id) => id,
        }
    }
}

/// A per-process mirror of the index for lock-free lookups.
#[derive(Debug, Default)]
pub struct Mirror {
    seen: u32,
    ids: HashMap<Box<[u8]>, u32>,
}

impl Mirror {
    /// Brings the mirror up to date with published entries.
    fn refresh(&mut self, index: &Index) {
        let used = index.used();
        let other: StdHashMap<u32, ()> = crate::store::catalogue::Family::ALL
            .iter()
            .filter_map(|f| index.other_id(*f).map(|id| (id, ())))
            .chain((0..MAX_APP_FAMILIES).filter_map(|f| index.app_other_id(f).map(|id| (id, ()))))
            .collect();
        for id in self.seen..used {
            if other.contains_key(&id) {
                continue;
            }
            let e = index.map.entry(id);
            let mut k = Vec::with_capacity(1 + e.len as usize);
            k.push(e.family);
            k.extend_from_slice(e_bytes(e));
            self.ids.insert(k.into_boxed_slice(), id);
        }
        self.seen = used;
    }

    /// The id of `key` if the index has it: from the mirror, else after
    /// bringing the mirror up to date (only when the index has grown).
    fn known(&mut self, index: &Index, key: &Key) -> Option<u32> {
        if let Some(&id) = self.ids.get(key.as_bytes()) {
            return Some(id);
        }
        if index.used() == self.seen {
            return None;
        }
        self.refresh(index);
        self.ids.get(key.as_bytes()).copied()
    }

    /// Resolves `key` to a row id, appending it to the index if it is new and
    /// its family has room.
    ///
    /// # Errors
    /// Locking errors or a full index.
    pub fn resolve(&mut self, index: &Index, key: &Key) -> io::Result<Resolved> {
        if let Some(id) = self.known(index, key) {
            return Ok(Resolved::Own(id));
        }
        let family = Family::from_code(key.family_code())
            .ok_or_else(|| io::Error::other("unknown family"))?;
        if !index.family_full(family) {
            if let Some(id) = index.append(key, false)? {
                self.refresh(index);
                return Ok(Resolved::Own(id));
            }
        }
        Ok(Resolved::Other(index.other(family)?))
    }
}

impl Mirror {
    /// Resolves the series `labels` of app family `fam`, appending it if it
    /// is new and the family has room; else the family's `other` series
    /// (whose labels are these names, each with the value `other`).
    ///
    /// # Errors
    /// Locking errors or a full index.
    pub(super) fn resolve_app(
        &mut self,
        index: &Index,
        fam: usize,
        labels: &[(&str, &str)],
    ) -> io::Result<Resolved> {
        let key = Key::app(fam, labels);
        if let Some(id) = self.known(index, &key) {
            return Ok(Resolved::Own(id));
        }
        let full = index
            .app_table()
            .families
            .get(fam)
            .is_none_or(|s| s.series.load(Ordering::Acquire) >= index.family_cap());
        if !full {
            if let Some(id) = index.append_app(&key, fam, false)? {
                self.refresh(index);
                return Ok(Resolved::Own(id));
            }
        }
        if let Some(id) = index.app_other_id(fam) {
            return Ok(Resolved::Other(id));
        }
        let other: Vec<(&str, &str)> = labels.iter().map(|(k, _)| (*k, OTHER)).collect();
        let id = index
            .append_app(&Key::app(fam, &other), fam, true)?
            .ok_or_else(|| io::Error::other("overflow series refused"))?;
        Ok(Resolved::Other(id))
    }
}
