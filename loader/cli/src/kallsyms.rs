//! Symbols of `/proc/kallsyms` (text only): names for kernel and module addresses.
use std::collections::BTreeMap;

/// Symbols of `/proc/kallsyms`: address -> (name, module).
pub struct Kallsyms {
    /// (name, module, global).
    syms: BTreeMap<u64, (String, Option<String>, bool)>,
}

impl Kallsyms {
    /// Parses kallsyms text ("address type name [module]"); text symbols only.
    pub fn parse(text: &str) -> Kallsyms {
        let mut syms = BTreeMap::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(a), Some(t), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            if !matches!(t, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(a, 16) else { continue };
            if addr == 0 {
                continue;
            }
            let module = f.next().map(|m| m.trim_matches(|c| c == '[' || c == ']').to_string());
            // Several names at one address (`__do_sys_getppid` and `__x64_sys_getppid`):
            // the first global one wins, else the first.
            let global = t.starts_with(|c: char| c.is_ascii_uppercase());
            match syms.entry(addr) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((name.to_string(), module, global));
                }
                std::collections::btree_map::Entry::Occupied(mut o) if global && !o.get().2 => {
                    o.insert((name.to_string(), module, global));
                }
                std::collections::btree_map::Entry::Occupied(_) => {}
            }
        }
        Kallsyms { syms }
    }

    /// Whether the addresses are real (kallsyms shows zeros to a reader without
    /// CAP_SYSLOG, or under kptr_restrict).
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// `name+0xoff [module]` of the symbol at or below `pc`.
    pub fn name(&self, pc: u64) -> String {
        match self.syms.range(..=pc).next_back() {
            Some((a, (n, Some(m), _))) => format!("{n}+{:#x} [{m}]", pc - a),
            Some((a, (n, None, _))) => format!("{n}+{:#x}", pc - a),
            None => format!("{pc:#x}"),
        }
    }

    /// Address of the text symbol `name` (the kernel's own, not a module's).
    pub fn addr(&self, name: &str) -> Option<u64> {
        self.syms.iter().find(|(_, (n, m, _))| n == name && m.is_none()).map(|(a, _)| *a)
    }

    /// Where `pc` is, by the symbol at or below it: `None` below every symbol, `Some(None)`
    /// in the kernel, `Some(Some(module))` in a module.
    pub fn module_of(&self, pc: u64) -> Option<Option<&str>> {
        self.syms.range(..=pc).next_back().map(|(_, (_, m, _))| m.as_deref())
    }

    /// Names of the text symbols in `[lo, hi)`, in address order (one per address).
    pub fn names_in(&self, lo: u64, hi: u64) -> Vec<&str> {
        self.syms.range(lo..hi).map(|(_, (n, _, _))| n.as_str()).collect()
    }

    /// The function (with its module) holding `pc`.
    pub fn function(&self, pc: u64) -> String {
        match self.syms.range(..=pc).next_back() {
            Some((_, (n, Some(m), _))) => format!("{n} [{m}]"),
            Some((_, (n, None, _))) => n.clone(),
            None => format!("{pc:#x}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t do_one
ffffffff81002000 D some_data
ffffffffc0000000 t kdbt_testmod_work\t[kdbt_testmod]
ffffffffc0000100 T kdbt_testmod_cmp\t[kdbt_testmod]
0000000000000000 T hidden
";

    #[test]
    fn kallsyms_names_kernel_and_module_text() {
        let ks = Kallsyms::parse(KALLSYMS);
        assert_eq!(ks.name(0xffffffff81001010), "do_one+0x10");
        assert_eq!(ks.name(0xffffffffc0000104), "kdbt_testmod_cmp+0x4 [kdbt_testmod]");
        assert_eq!(ks.function(0xffffffffc0000010), "kdbt_testmod_work [kdbt_testmod]");
        // Data symbols are not functions: an address past do_one stays in do_one.
        assert_eq!(ks.name(0xffffffff81002004), "do_one+0x1004");
        assert_eq!(ks.name(0x1000), "0x1000");
        assert!(Kallsyms::parse("0000000000000000 T x\n").is_empty());
    }

    #[test]
    fn kallsyms_prefers_the_global_name_at_an_address() {
        let ks = Kallsyms::parse(
            "ffffffff8105088b t __do_sys_getppid\nffffffff8105088b T __x64_sys_getppid\nffffffff8105088b T later\n",
        );
        assert_eq!(ks.function(0xffffffff8105088b), "__x64_sys_getppid");
        let ks = Kallsyms::parse("ffffffff81000000 t a\nffffffff81000000 t b\n");
        assert_eq!(ks.function(0xffffffff81000000), "a");
    }

    #[test]
    fn kallsyms_lists_the_names_in_a_range() {
        let ks = Kallsyms::parse(KALLSYMS);
        assert_eq!(ks.names_in(0xffffffff81000000, 0xffffffff81002000), ["_stext", "do_one"]);
        assert_eq!(ks.names_in(0xffffffff81000001, 0xffffffff81001000), Vec::<&str>::new());
        assert_eq!(ks.names_in(0xffffffffc0000000, 0xffffffffc0000100), ["kdbt_testmod_work"]);
    }

    #[test]
    fn kallsyms_finds_kernel_symbols_and_modules() {
        let ks = Kallsyms::parse(KALLSYMS);
        assert_eq!(ks.addr("_stext"), Some(0xffffffff81000000));
        assert_eq!(ks.addr("kdbt_testmod_cmp"), None, "module symbols are not the kernel's");
        assert_eq!(ks.module_of(0xffffffffc0000104), Some(Some("kdbt_testmod")));
        assert_eq!(ks.module_of(0xffffffff81000010), Some(None));
        assert_eq!(ks.module_of(0x10), None);
    }
}
