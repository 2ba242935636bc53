//! Scans of a memtable: chunks of keys resolved at a snapshot, forward by
//! walking the skiplist, backward by searching back a stretch at a time.

use std::collections::VecDeque;
use std::ops::Bound;

use bytes::Bytes;

use super::{
    Direction, InternalKey, KeyView, ListEntry, Memtable, Probe, Resolved, Stored, Visible, compare,
};
use crate::slice::Slice;

impl Memtable {
    /// Appends to `out` up to `max` keys in `direction` within the bounds,
    /// each resolved at `snapshot_seq`; returns whether the range is
    /// exhausted. Continue a scan by narrowing the bound on the side it came
    /// from to exclude the last key returned.
    pub fn scan_chunk(
        &self,
        snapshot_seq: u64,
        direction: Direction,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        match direction {
            Direction::Forward => {
                let past_upper = |key: &InternalKey| !within_upper(&key.user_key, upper);
                resolve_forward(self.first_within(lower), snapshot_seq, past_upper, max, out)
            }
            Direction::Backward => self.scan_backward(snapshot_seq, lower, upper, max, out),
        }
    }

    /// A backward chunk. The skiplist links each entry to the next one
    /// only, so a step back is a search from the top of the list (the
    /// `prev` of `crossbeam-skiplist`). With one per key, a reverse scan of
    /// a memtable of a million keys took 443 ms, a forward one 354 ms, and
    /// it could not overlap its cache misses as the forward walk now does
    /// ([`HeldKey`]): this way it takes 334 ms, and the forward scan 204
    /// (`cargo bench --bench core -- '^reads/full_scan'`). So a chunk
    /// steps back only over its first few keys ([`BACKWARD_PROBE_KEYS`]),
    /// estimates from how far apart they are how far back the rest of the
    /// chunk reaches (see [`KeySpacing`]), and reads that stretch forwards,
    /// one search to its start and then a step per entry, keeping the keys
    /// nearest the end. A guess that falls short is followed by one farther
    /// back, over the stretch before it; one that would read far more keys
    /// than the chunk wants is given up, and the rest of the chunk steps
    /// back one key at a time. Any guess gives the same keys; only the cost
    /// depends on it.
    fn scan_backward(
        &self,
        snapshot_seq: u64,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        let first = out.len();
        let probe = if max > 2 * BACKWARD_PROBE_KEYS {
            BACKWARD_PROBE_KEYS
        } else {
            max
        };
        if self.step_backward(snapshot_seq, lower, upper, probe, out) {
            return true;
        }
        let (Some(high), Some(low)) = (out.get(first), out.back()) else {
            // `step_backward` added `probe` keys (it returned false).
            return false;
        };
        let mut left = max - (out.len() - first);
        let mut boundary = low.key.to_vec();
        if left == 0 {
            return false;
        }
        if let Some(spacing) = KeySpacing::measure(&low.key, &high.key, out.len() - first) {
            let mut stretch = Vec::new();
            for attempt in 0..BACKWARD_GUESSES {
                // Aim a little past the keys wanted (an eighth), twice as far
                // again on each attempt.
                let keys_back = (left as u64 + left as u64 / 8 + 1) << attempt;
                let Some(guess) = spacing
                    .key_before(keys_back)
                    .filter(|guess| *guess < boundary)
                else {
                    // The window cannot go lower: step instead.
                    break;
                };
                let (start, reaches_floor) = self.stretch_start(&guess, lower);
                stretch.clear();
                // Every version of `boundary` sorts at or after this probe.
                let end = Probe::new(&boundary, u64::MAX);
                let at_boundary = |key: &InternalKey| compare(key, &end).is_ge();
                let most = 4 * left + 64;
                if !resolve_forward(start, snapshot_seq, at_boundary, most, &mut stretch) {
                    // A poor guess: far more keys than wanted. Step instead.
                    break;
                }
                if stretch.len() >= left {
                    out.extend(stretch.drain(stretch.len() - left..).rev());
                    return reaches_floor && stretch.is_empty();
                }
                left -= stretch.len();
                out.extend(stretch.drain(..).rev());
                if reaches_floor {
                    return true;
                }
                boundary = guess;
            }
        }
        self.step_backward(snapshot_seq, lower, Bound::Excluded(&boundary), left, out)
    }

    /// Where a stretch read forwards from `guess` starts: the first version
    /// at or after `guess`, or, where the lower bound is not below it, the
    /// first within that bound. Also says whether the stretch then reaches
    /// down to the bound (or the list's first entry), so that no key lies
    /// before it.
    fn stretch_start(&self, guess: &[u8], lower: Bound<&[u8]>) -> (Option<ListEntry<'_>>, bool) {
        let bounded = match lower {
            Bound::Included(key) | Bound::Excluded(key) => key >= guess,
            Bound::Unbounded => false,
        };
        let start = if bounded {
            self.first_within(lower)
        } else {
            self.first_within(Bound::Included(guess))
        };
        let at_front = match (&start, self.versions.front()) {
            (Some(start), Some(front)) => {
                start.key().seq == front.key().seq && start.key().user_key == front.key().user_key
            }
            // Nothing at or after the guess (the chunk's keys are, so this
            // does not happen): claim nothing about what lies before it.
            (None, _) | (Some(_), None) => false,
        };
        (start, bounded || at_front)
    }

    /// The first entry within `lower`: the newest version of the first key
    /// the bound admits.
    fn first_within(&self, lower: Bound<&[u8]>) -> Option<ListEntry<'_>> {
        match lower {
            Bound::Unbounded => self.versions.front(),
            // The newest possible version of `key` comes first.
            Bound::Included(key) => {
                self.versions
                    .lower_bound(Bound::Included(&Probe::new(key, u64::MAX) as &dyn KeyView))
            }
            // Every version of `key` sorts at or before (key, 0).
            Bound::Excluded(key) => self
                .versions
                .lower_bound(Bound::Excluded(&Probe::new(key, 0) as &dyn KeyView)),
        }
    }

    /// Steps back one key at a time (a search each): appends up to `max`
    /// keys below `upper`, down to `lower`; returns whether none is left.
    fn step_backward(
        &self,
        snapshot_seq: u64,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        let mut entry = match upper {
            Bound::Unbounded => self.versions.back(),
            // The oldest possible version of `key` comes last.
            Bound::Included(key) => self
                .versions
                .upper_bound(Bound::Included(&Probe::new(key, 0) as &dyn KeyView)),
            Bound::Excluded(key) => {
                self.versions
                    .upper_bound(Bound::Excluded(&Probe::new(key, u64::MAX) as &dyn KeyView))
            }
        };
        let mut added = 0;
        while let Some(current) = entry {
            let head = current.key().clone();
            let key = &head.user_key;
            if !within_lower(key, lower) {
                return true;
            }
            if added == max {
                return false;
            }
            // Versions come oldest first here: the last visible one seen wins.
            let mut version: Option<ListEntry<'_>> = Some(current);
            let mut found: Option<Resolved> = None;
            while let Some(v) = version {
                if !v.key().same_user_key(&head) {
                    version = Some(v);
                    break;
                }
                if v.key().seq <= snapshot_seq {
                    found = Some(Resolved {
                        key: Slice::from_shared(key),
                        seq: v.key().seq,
                        value: v.value().value.clone(),
                        expires: v.value().expires,
                    });
                }
                version = v.prev();
            }
            if let Some(resolved) = found {
                out.push_back(resolved);
                added += 1;
            }
            entry = version;
        }
        true
    }
}

/// The key a forward walk found last, held back for one key before it is
/// copied into the chunk: a chunk copies short keys into their `Slice`,
/// and in a large memtable each key's bytes are a cache miss of their own,
/// which the copy would wait on right after the miss on the key's entry.
/// Held back, the key's bytes are asked for at once and copied only after
/// the walk has gone on to the next entry, so the two misses overlap.
#[derive(Default)]
struct HeldKey(Option<(Bytes, u64, Stored)>);

impl HeldKey {
    /// Holds `key`'s visible version, and appends the one held before.
    #[inline]
    fn hold(&mut self, key: Bytes, seq: u64, stored: Stored, out: &mut impl Extend<Resolved>) {
        crate::mmap::prefetch(key.get(..1).unwrap_or_default());
        if let Some(previous) = self.0.replace((key, seq, stored)) {
            out.extend([HeldKey::resolved(previous)]);
        }
    }

    /// Appends the key held, if any.
    fn flush(&mut self, out: &mut impl Extend<Resolved>) {
        if let Some(held) = self.0.take() {
            out.extend([HeldKey::resolved(held)]);
        }
    }

    /// The chunk's entry for a key once held.
    fn resolved((key, seq, stored): (Bytes, u64, Stored)) -> Resolved {
        Resolved {
            key: Slice::from_shared(&key),
            seq,
            value: stored.value,
            expires: stored.expires,
        }
    }
}

/// Walks the versions of `head`'s key from `first`, its newest: returns
/// the first visible at `snapshot_seq` (its sequence number and value, or
/// `None` if every version is newer) and the entry after the key's last.
#[inline]
fn first_visible<'a>(
    first: ListEntry<'a>,
    head: &InternalKey,
    snapshot_seq: u64,
) -> (Option<Visible>, Option<ListEntry<'a>>) {
    let mut version = Some(first);
    let mut found = None;
    while let Some(v) = version {
        if !v.key().same_user_key(head) {
            return (found, Some(v));
        }
        if found.is_none() && v.key().seq <= snapshot_seq {
            found = Some((v.key().seq, v.value().clone()));
        }
        version = v.next();
    }
    (found, None)
}

/// Keys a backward chunk steps back over one at a time before it guesses
/// how far back the rest reaches (see `Memtable::scan_backward`); chunks
/// of at most twice as many keys step over all of them.
const BACKWARD_PROBE_KEYS: usize = 8;

/// Guesses a backward chunk makes, each twice as far back as the one
/// before, before it steps back over the rest.
const BACKWARD_GUESSES: u32 = 3;

/// Appends to `out`, in ascending order, the version visible at
/// `snapshot_seq` of each key from `entry` on, until an entry is
/// `past_end` (true: the range is read) or `max` keys are appended and
/// another would follow (false).
#[inline]
fn resolve_forward(
    mut entry: Option<ListEntry<'_>>,
    snapshot_seq: u64,
    past_end: impl Fn(&InternalKey) -> bool,
    max: usize,
    out: &mut impl Extend<Resolved>,
) -> bool {
    let mut added = 0;
    let mut held = HeldKey::default();
    while let Some(current) = entry {
        if past_end(current.key()) {
            break;
        }
        if added == max {
            held.flush(out);
            return false;
        }
        let head = current.key().clone();
        let (found, after) = first_visible(current, &head, snapshot_seq);
        if let Some((seq, stored)) = found {
            held.hold(head.user_key, seq, stored, out);
            added += 1;
        }
        entry = after;
    }
    held.flush(out);
    true
}

/// How far apart neighbouring keys are, measured on a few of them, so that
/// a backward chunk can guess a key about `n` keys before the lowest: keys
/// are read as big-endian numbers in an 8-byte window that ends just after
/// the first byte where the measured keys differ, and the guess keeps the
/// bytes before the window.
///
/// A guess is only a place to start reading from: a wrong one costs time,
/// never keys. Each guess is below the lowest measured key, since its
/// window is smaller and the bytes before it are the key's own.
struct KeySpacing {
    /// The lowest measured key's bytes before the window (as many as
    /// the window's start).
    leading: Vec<u8>,
    /// The lowest key's window.
    low_window: u64,
    /// The mean distance between neighbouring keys, in the window.
    per_key: u64,
}

impl KeySpacing {
    /// The spacing of `keys` keys running from `low` up to `high`; `None`
    /// where it cannot be told (fewer than two keys, or windows that do
    /// not differ by at least one per key).
    fn measure(low: &[u8], high: &[u8], keys: usize) -> Option<KeySpacing> {
        let common = low.iter().zip(high).take_while(|(a, b)| a == b).count();
        let window_start = (common + 1).saturating_sub(8);
        let low_window = window_at(low, window_start);
        let high_window = window_at(high, window_start);
        let gaps = u64::try_from(keys.checked_sub(1)?).ok()?;
        let per_key = high_window.checked_sub(low_window)?.checked_div(gaps)?;
        // The window starts at or before the first difference, within `low`.
        let leading = low.get(..window_start)?;
        (per_key > 0).then(|| KeySpacing {
            leading: leading.to_vec(),
            low_window,
            per_key,
        })
    }

    /// A key about `n` keys before the lowest measured one (the lowest
    /// key's leading bytes and a zero window, if the estimate reaches back
    /// past them); `None` if the lowest key's window is zero already.
    fn key_before(&self, n: u64) -> Option<Vec<u8>> {
        if self.low_window == 0 {
            return None;
        }
        let window = self
            .low_window
            .saturating_sub(self.per_key.saturating_mul(n));
        let mut key = Vec::with_capacity(self.leading.len() + 8);
        key.extend_from_slice(&self.leading);
        key.extend_from_slice(&window.to_be_bytes());
        Some(key)
    }
}

/// The eight bytes of `key` from `start` as a big-endian number, padded
/// with zeros past the key's end.
fn window_at(key: &[u8], start: usize) -> u64 {
    let mut window = [0u8; 8];
    let bytes = key.get(start..).unwrap_or_default();
    let len = bytes.len().min(8);
    window[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(window)
}

/// A bound on owned keys as a bound on byte slices.
pub(crate) fn as_ref_bound(bound: &Bound<Bytes>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Whether `key` is at or before the upper bound.
pub(crate) fn within_upper(key: &[u8], upper: Bound<&[u8]>) -> bool {
    match upper {
        Bound::Unbounded => true,
        Bound::Included(bound) => key <= bound,
        Bound::Excluded(bound) => key < bound,
    }
}

/// Whether `key` is at or after the lower bound.
pub(crate) fn within_lower(key: &[u8], lower: Bound<&[u8]>) -> bool {
    match lower {
        Bound::Unbounded => true,
        Bound::Included(bound) => key >= bound,
        Bound::Excluded(bound) => key > bound,
    }
}
