//! `kdbt cov --drcov FILE`: bbcov's blocks as a drcov file (DynamoRIO drcov, version 2,
//! module table version 2), the format coverage viewers for disassemblers read.
//!
//! Layout: a text header (`DRCOV VERSION`, `DRCOV FLAVOR`, the module table with one line
//! per module: id, base, end, entry, checksum, timestamp, path), then `BB Table: N bbs`
//! and N binary records of 8 bytes, little-endian: the block's offset from its module's
//! base (u32), its length in bytes (u16) and its module id (u16). drcov records no hit
//! counts: a block is in the table when it ran at least once.
//!
//! Modules: `vmlinux` from `_stext` to `_etext`, and each kernel module that has executed
//! blocks, based at the address `/proc/modules` gives (its text, since Linux 6.4 and
//! before), named `NAME.ko`. Which module a block belongs to is read from kallsyms (the
//! symbol at or below it); a block no module holds is left out and counted.
use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::kallsyms::Kallsyms;

/// One line of the module table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub base: u64,
    pub end: u64,
}

/// Module name -> (load address, size), from `/proc/modules` text
/// (`name size refs deps state address [taint]`). Hidden (zero) addresses are left out.
pub fn parse_proc_modules(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(size), Some(addr)) = (f.first(), f.get(1), f.get(5)) else { continue };
        let (Ok(size), Ok(addr)) = (size.parse::<u64>(), u64::from_str_radix(addr.trim_start_matches("0x"), 16)) else {
            continue;
        };
        if addr != 0 {
            out.insert(name.to_string(), (addr, size));
        }
    }
    out
}

/// What [`write`] wrote.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    pub blocks: usize,
    pub modules: usize,
    /// Blocks outside the kernel's text and every listed module: not written.
    pub outside: usize,
}

/// Writes `blocks` as a drcov file; modules are those holding at least one block.
pub fn write(
    out: &mut impl Write,
    ks: &Kallsyms,
    modules: &BTreeMap<String, (u64, u64)>,
    blocks: &[kdbt_abi::DbtCovEntry],
) -> io::Result<Written> {
    let kernel = match (ks.addr("_stext"), ks.addr("_etext")) {
        (Some(b), Some(e)) if b < e => Some(Module { path: "vmlinux".into(), base: b, end: e }),
        _ => None,
    };
    let mut table: Vec<Module> = Vec::new();
    let mut records: Vec<(u32, u16, u16)> = Vec::with_capacity(blocks.len());
    let mut outside = 0;
    for b in blocks {
        let m = match ks.module_of(b.pc) {
            Some(None) => kernel.clone(),
            Some(Some(name)) => {
                modules.get(name).map(|&(base, size)| Module { path: format!("{name}.ko"), base, end: base + size })
            }
            None => None,
        };
        let Some(m) = m.filter(|m| (m.base..m.end).contains(&b.pc)) else {
            outside += 1;
            continue;
        };
        let id = match table.iter().position(|t| *t == m) {
            Some(i) => i,
            None => {
                table.push(m);
                table.len() - 1
            }
        };
        let (Ok(off), Ok(id)) = (u32::try_from(b.pc - table[id].base), u16::try_from(id)) else {
            outside += 1;
            continue;
        };
        records.push((off, u16::try_from(b.len).unwrap_or(u16::MAX), id));
    }
    writeln!(out, "DRCOV VERSION: 2")?;
    writeln!(out, "DRCOV FLAVOR: drcov")?;
    writeln!(out, "Module Table: version 2, count {}", table.len())?;
    writeln!(out, "Columns: id, base, end, entry, checksum, timestamp, path")?;
    for (i, m) in table.iter().enumerate() {
        writeln!(
            out,
            "{i:2}, {:#018x}, {:#018x}, 0x0000000000000000, 0x00000000, 0x00000000, {}",
            m.base, m.end, m.path
        )?;
    }
    writeln!(out, "BB Table: {} bbs", records.len())?;
    for (off, len, id) in &records {
        out.write_all(&off.to_le_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        out.write_all(&id.to_le_bytes())?;
    }
    Ok(Written { blocks: records.len(), modules: table.len(), outside })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kallsyms::tests::KALLSYMS;

    const MODULES: &str = "kdbt_testmod 16384 0 - Live 0xffffffffc0000000 (O)\n\
                           kdbt 2097152 0 - Live 0xffffffffc1000000 (O)\n\
                           hidden 4096 0 - Live 0x0000000000000000\n";

    /// (base, end, path) of a module-table line; (offset, length, module id) of a record.
    type Parsed = (Vec<(u64, u64, String)>, Vec<(u32, u16, u16)>);

    /// An independent reader of the format, as a viewer would parse it.
    fn read(bytes: &[u8]) -> Parsed {
        let text_end = bytes.windows(9).position(|w| w == b"BB Table:").expect("BB Table");
        let nl = text_end + bytes[text_end..].iter().position(|&c| c == b'\n').unwrap();
        let head = std::str::from_utf8(&bytes[..nl]).unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("DRCOV VERSION: 2"));
        assert_eq!(lines.next(), Some("DRCOV FLAVOR: drcov"));
        let count: usize =
            lines.next().unwrap().strip_prefix("Module Table: version 2, count ").unwrap().parse().unwrap();
        assert_eq!(lines.next(), Some("Columns: id, base, end, entry, checksum, timestamp, path"));
        let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
        let mods: Vec<_> = (0..count)
            .map(|i| {
                let f: Vec<&str> = lines.next().unwrap().split(", ").collect();
                assert_eq!(f[0].trim().parse::<usize>().unwrap(), i);
                (hex(f[1]), hex(f[2]), f[6].to_string())
            })
            .collect();
        let n: usize =
            lines.next().unwrap().strip_prefix("BB Table: ").unwrap().strip_suffix(" bbs").unwrap().parse().unwrap();
        let recs = &bytes[nl + 1..];
        assert_eq!(recs.len(), 8 * n, "8 bytes per block");
        let bbs = recs
            .chunks(8)
            .map(|r| {
                let u32_at = u32::from_le_bytes(r[0..4].try_into().unwrap());
                (
                    u32_at,
                    u16::from_le_bytes(r[4..6].try_into().unwrap()),
                    u16::from_le_bytes(r[6..8].try_into().unwrap()),
                )
            })
            .collect();
        (mods, bbs)
    }

    #[test]
    fn drcov_names_modules_and_offsets_blocks_from_their_base() {
        let ks = Kallsyms::parse(&format!("{KALLSYMS}ffffffff81800000 T _etext\n"));
        let e = |pc, len| kdbt_abi::DbtCovEntry { pc, hits: 3, len, reserved: 0 };
        let blocks = [
            e(0xffffffffc0000010, 12),
            e(0xffffffff81001000, 7),
            e(0xffffffffc0000104, 70000), // longer than u16: clamped
            e(0x1000, 4),                 // below every symbol
            e(0xffffffff81900000, 4),     // past _etext
        ];
        let mods = parse_proc_modules(MODULES);
        assert_eq!(mods.get("kdbt_testmod"), Some(&(0xffffffffc0000000, 16384)));
        assert!(!mods.contains_key("hidden"));
        let mut out = Vec::new();
        let w = write(&mut out, &ks, &mods, &blocks).unwrap();
        assert_eq!(w, Written { blocks: 3, modules: 2, outside: 2 });
        let (m, bbs) = read(&out);
        assert_eq!(
            m,
            [
                (0xffffffffc0000000, 0xffffffffc0004000, "kdbt_testmod.ko".to_string()),
                (0xffffffff81000000, 0xffffffff81800000, "vmlinux".to_string())
            ]
        );
        assert_eq!(bbs, [(0x10, 12, 0), (0x1000, 7, 1), (0x104, u16::MAX, 0)]);
    }

    #[test]
    fn drcov_without_symbols_writes_an_empty_table() {
        let mut out = Vec::new();
        let blocks = [kdbt_abi::DbtCovEntry { pc: 0xffffffffc0000010, hits: 1, len: 4, reserved: 0 }];
        let w = write(&mut out, &Kallsyms::parse(""), &BTreeMap::new(), &blocks).unwrap();
        assert_eq!(w, Written { blocks: 0, modules: 0, outside: 1 });
        let (m, bbs) = read(&out);
        assert!(m.is_empty() && bbs.is_empty());
    }
}
