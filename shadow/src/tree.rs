//! Operations on one shadow hierarchy (PML4 → PDPT → PD → PT, 4 KiB leaves only).
//!
//! Non-leaf shadow entries grant everything (P, R/W, U/S, A, no XD) and only point to the
//! next shadow table: every permission, the memory-type bits, G and the protection key
//! are in the 4 KiB leaf, combined over the guest's levels. Two software bits (ignored by
//! the CPU) remember where a leaf came from, so that an INVLPG of a large guest page can
//! drop every piece of it: in a leaf, [`FROM_2M`] / [`FROM_1G`] say it is a piece of a
//! guest 2 MB / 1 GB page; in a PDE the same bits say its PT holds such pieces, in a PDPTE
//! [`FROM_1G`] says its PD does.
use crate::pool::{FramePool, FreeList};
use crate::walk::bits::{A, ADDR, G, P, RW, US};

pub(crate) const FROM_2M: u64 = 1 << 9;
pub(crate) const FROM_1G: u64 = 1 << 10;
pub(crate) const NONLEAF: u64 = P | RW | US | A;

fn idx(la: u64, level: u32) -> usize {
    ((la >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

fn sign_extend(la: u64) -> u64 {
    (((la << 16) as i64) >> 16) as u64
}

/// The frame pool ran dry while a path was built (the tables already linked stay, empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutOfFrames;

/// The PT and index of `la`'s leaf, if the path to it exists.
pub(crate) fn leaf_slot<F: FramePool>(pool: &F, root: u64, la: u64) -> Option<(u64, usize)> {
    if root == 0 {
        return None;
    }
    let mut t = root;
    for level in (2..=4).rev() {
        let e = pool.read_entry(t, idx(la, level));
        if e & P == 0 {
            return None;
        }
        t = e & ADDR;
    }
    Some((t, idx(la, 1)))
}

/// Writes `leaf` as the shadow leaf of `la`, building the path from free frames.
pub(crate) fn install<F: FramePool>(
    pool: &mut F,
    free: &mut FreeList,
    root: u64,
    la: u64,
    leaf: u64,
) -> Result<(), OutOfFrames> {
    let marks = leaf & (FROM_2M | FROM_1G);
    let mut t = root;
    for level in (2..=4).rev() {
        let mark = match level {
            2 => marks,
            3 => marks & FROM_1G,
            _ => 0,
        };
        let i = idx(la, level);
        let e = pool.read_entry(t, i);
        if e & P == 0 {
            let f = free.pop(pool).ok_or(OutOfFrames)?;
            pool.write_entry(t, i, f | NONLEAF | mark);
            t = f;
        } else {
            if e & mark != mark {
                pool.write_entry(t, i, e | mark);
            }
            t = e & ADDR;
        }
    }
    pool.write_entry(t, idx(la, 1), leaf);
    Ok(())
}

/// Zeroes `la`'s leaf only. True if there was one.
pub(crate) fn zap_leaf<F: FramePool>(pool: &mut F, root: u64, la: u64) -> bool {
    match leaf_slot(pool, root, la) {
        Some((pt, i)) if pool.read_entry(pt, i) & P != 0 => {
            pool.write_entry(pt, i, 0);
            true
        }
        _ => false,
    }
}

/// What [`invalidate`] removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Invalidated {
    /// `la`'s own leaf.
    pub page: bool,
    /// Pieces of a large guest page around `la` (more than one linear page).
    pub range: bool,
}

fn zap_marked<F: FramePool>(pool: &mut F, pt: u64, mark: u64) -> bool {
    let mut any = false;
    for i in 0..512 {
        let e = pool.read_entry(pt, i);
        if e & P != 0 && e & mark != 0 {
            pool.write_entry(pt, i, 0);
            any = true;
        }
    }
    any
}

/// What INVLPG `la` means for a hierarchy: `la`'s leaf, and if pieces of a 2 MB / 1 GB
/// guest page were shadowed in the aligned 2 MB / 1 GB window around `la`, all of them
/// (the guest page is gone from the TLB as a whole, whichever 4 KiB of it `la` names).
pub(crate) fn invalidate<F: FramePool>(pool: &mut F, root: u64, la: u64) -> Invalidated {
    let mut out = Invalidated::default();
    let e4 = pool.read_entry(root, idx(la, 4));
    if e4 & P == 0 {
        return out;
    }
    let pdpt = e4 & ADDR;
    let i3 = idx(la, 3);
    let e3 = pool.read_entry(pdpt, i3);
    if e3 & P == 0 {
        return out;
    }
    let pd = e3 & ADDR;
    if e3 & FROM_1G != 0 {
        for i in 0..512 {
            let e2 = pool.read_entry(pd, i);
            if e2 & P != 0 && e2 & FROM_1G != 0 {
                out.range |= zap_marked(pool, e2 & ADDR, FROM_1G);
                pool.write_entry(pd, i, e2 & !FROM_1G);
            }
        }
        pool.write_entry(pdpt, i3, e3 & !FROM_1G);
    }
    let i2 = idx(la, 2);
    let e2 = pool.read_entry(pd, i2);
    if e2 & P == 0 {
        return out;
    }
    let pt = e2 & ADDR;
    if e2 & FROM_2M != 0 {
        out.range |= zap_marked(pool, pt, FROM_2M);
        pool.write_entry(pd, i2, e2 & !FROM_2M);
    }
    let i1 = idx(la, 1);
    if pool.read_entry(pt, i1) & P != 0 {
        pool.write_entry(pt, i1, 0);
        out.page = true;
    }
    out
}

/// Calls `f(la, leaf)` for every present leaf; a `Some(new)` result replaces the leaf.
/// Returns how many leaves were replaced.
pub(crate) fn for_each_leaf<F: FramePool>(
    pool: &mut F,
    root: u64,
    mut f: impl FnMut(u64, u64) -> Option<u64>,
) -> usize {
    let mut changed = 0;
    for i4 in 0..512 {
        let e4 = pool.read_entry(root, i4);
        if e4 & P == 0 {
            continue;
        }
        for i3 in 0..512 {
            let e3 = pool.read_entry(e4 & ADDR, i3);
            if e3 & P == 0 {
                continue;
            }
            for i2 in 0..512 {
                let e2 = pool.read_entry(e3 & ADDR, i2);
                if e2 & P == 0 {
                    continue;
                }
                let pt = e2 & ADDR;
                for i1 in 0..512 {
                    let e = pool.read_entry(pt, i1);
                    if e & P == 0 {
                        continue;
                    }
                    let la = sign_extend((i4 as u64) << 39 | (i3 as u64) << 30 | (i2 as u64) << 21 | (i1 as u64) << 12);
                    if let Some(new) = f(la, e) {
                        if new != e {
                            pool.write_entry(pt, i1, new);
                            changed += 1;
                        }
                    }
                }
            }
        }
    }
    changed
}

/// Zeroes every leaf that is not global (what a flush of non-global translations leaves).
/// Tables stay linked.
pub(crate) fn clear_nonglobal<F: FramePool>(pool: &mut F, root: u64) -> usize {
    for_each_leaf(pool, root, |_, e| if e & G == 0 { Some(0) } else { None })
}

/// Puts every table below `root` on the free list and zeroes `root`. Returns the number
/// of frames freed.
pub(crate) fn free_below<F: FramePool>(pool: &mut F, free: &mut FreeList, root: u64) -> usize {
    let mut n = 0;
    for i4 in 0..512 {
        let e4 = pool.read_entry(root, i4);
        if e4 & P == 0 {
            continue;
        }
        let pdpt = e4 & ADDR;
        for i3 in 0..512 {
            let e3 = pool.read_entry(pdpt, i3);
            if e3 & P == 0 {
                continue;
            }
            let pd = e3 & ADDR;
            for i2 in 0..512 {
                let e2 = pool.read_entry(pd, i2);
                if e2 & P != 0 {
                    free.push(pool, e2 & ADDR);
                    n += 1;
                }
            }
            free.push(pool, pd);
            n += 1;
        }
        free.push(pool, pdpt);
        n += 1;
        pool.write_entry(root, i4, 0);
    }
    n
}
