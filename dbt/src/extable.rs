//! Linux x86-64 exception tables, as a kernel environment reads and writes them for fault
//! sites ([`crate::Env::fault_slot`]): `struct exception_table_entry { int insn, fixup,
//! data; }`, `insn` and `fixup` relative to their own field's address
//! (`ARCH_HAS_RELATIVE_EXTABLE`), `data` the handler type and its arguments (register,
//! immediate), sorted by `insn` when the module is loaded.

/// Bytes of one entry.
pub const ENTRY_BYTES: u64 = 12;
/// Offset of the `fixup` field in an entry.
pub const FIXUP_OFF: u64 = 4;
/// Offset of the `data` field in an entry.
pub const DATA_OFF: u64 = 8;

/// An entry with its addresses made absolute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The instruction whose fault the entry handles.
    pub insn: u64,
    /// Where the handler continues.
    pub fixup: u64,
    /// Handler type and arguments (`EX_DATA_*`), copied as is.
    pub data: u32,
}

/// The entry at address `at` whose three 32-bit fields are `w`.
pub fn decode(at: u64, w: [i32; 3]) -> Entry {
    Entry {
        insn: at.wrapping_add_signed(w[0] as i64),
        fixup: (at + FIXUP_OFF).wrapping_add_signed(w[1] as i64),
        data: w[2] as u32,
    }
}

/// The `fixup` field of an entry at `at` that continues at `fixup`; None when `fixup` is
/// out of a 32-bit displacement's reach from the field.
pub fn fixup_field(at: u64, fixup: u64) -> Option<i32> {
    i32::try_from(fixup.wrapping_sub(at + FIXUP_OFF) as i64).ok()
}

/// The entry for `pc` in `table`, sorted by `insn` (the kernel's own search is a binary
/// search over the same order).
pub fn find(table: &[Entry], pc: u64) -> Option<&Entry> {
    index_of(table, pc).map(|i| &table[i])
}

/// The index of [`find`]'s entry.
pub fn index_of(table: &[Entry], pc: u64) -> Option<usize> {
    table.binary_search_by_key(&pc, |e| e.insn).ok()
}

/// The slot each fault site of a table was last given, with the bytes it was translated
/// from (a 64-bit FNV-1a hash of them): a retranslation of the same instruction, after
/// an invalidation or a cache reset, gets the same slot again instead of a new one (the
/// engine writes the same code there, as its slots continue at the next native pc),
/// so that a session's slots are not used up by retranslations. Other bytes at the same
/// pc (the text was patched) get a new slot: a task asleep in a fault at the old one
/// resumes into the old instruction's slot, unchanged.
pub struct SlotMemo {
    /// By site index: slot + 1 (0: none yet) and the bytes' hash.
    by_site: alloc::vec::Vec<(u32, u64)>,
}

impl SlotMemo {
    /// A memo for a table of `sites` entries; None when out of memory.
    pub fn new(sites: usize) -> Option<SlotMemo> {
        let mut by_site = alloc::vec::Vec::new();
        by_site.try_reserve_exact(sites).ok()?;
        by_site.resize(sites, (0, 0));
        Some(SlotMemo { by_site })
    }

    fn hash(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    }

    /// The slot site `site` was given for these `bytes`, if any.
    pub fn get(&self, site: usize, bytes: &[u8]) -> Option<usize> {
        let &(k, h) = self.by_site.get(site)?;
        (k != 0 && h == Self::hash(bytes)).then(|| k as usize - 1)
    }

    /// Site `site`, translated from `bytes`, was given `slot`.
    pub fn put(&mut self, site: usize, bytes: &[u8], slot: usize) {
        if let (Some(e), Ok(k)) = (self.by_site.get_mut(site), u32::try_from(slot + 1)) {
            *e = (k, Self::hash(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_gets_its_slot_again_for_the_same_bytes_only() {
        let mut m = SlotMemo::new(3).unwrap();
        let mov = [0x8b, 0x07];
        assert_eq!(m.get(1, &mov), None);
        m.put(1, &mov, 7);
        assert_eq!(m.get(1, &mov), Some(7));
        assert_eq!(m.get(0, &mov), None, "another site");
        assert_eq!(m.get(1, &[0x8b, 0x06]), None, "patched bytes");
        assert_eq!(m.get(1, &[0x8b, 0x07, 0x90]), None, "another length");
        assert_eq!(m.get(5, &mov), None, "out of the table");
        m.put(5, &mov, 1);
        m.put(1, &[0x8b, 0x06], 0);
        assert_eq!(m.get(1, &[0x8b, 0x06]), Some(0));
        assert_eq!(m.get(1, &mov), None);
    }

    #[test]
    fn entries_decode_relative_to_their_fields_and_round_trip() {
        let at = 0xffff_ffff_4000_1000u64;
        // insn 0x40 before the entry, fixup 0x10 after its field.
        let e = decode(at, [-0x40, 0x10, 0x0003_0001]);
        assert_eq!(e, Entry { insn: at - 0x40, fixup: at + 4 + 0x10, data: 0x0003_0001 });
        assert_eq!(fixup_field(at, e.fixup), Some(0x10));
        assert_eq!(fixup_field(at, at + 4 - 0x8000_0000), Some(i32::MIN));
        assert_eq!(fixup_field(at, at + 4 + 0x8000_0000), None);
        assert_eq!(fixup_field(at, at + 4 - 0x8000_0001), None);
    }

    #[test]
    fn lookup_is_exact() {
        let t: alloc::vec::Vec<Entry> =
            [0x100u64, 0x180, 0x200].iter().map(|&insn| Entry { insn, fixup: insn + 1, data: 1 }).collect();
        assert_eq!(find(&t, 0x180).map(|e| e.fixup), Some(0x181));
        assert_eq!(find(&t, 0x181), None);
        assert_eq!(find(&t, 0x100).map(|e| e.insn), Some(0x100));
        assert_eq!(find(&t, 0x200).map(|e| e.insn), Some(0x200));
        assert_eq!(find(&[], 0x200), None);
    }
}
