//! The glue <-> Rust interface of `kdbt.ko` is declared once, in
//! `loader/module/kdbt_glue.h`; the Rust staticlib mirrors it by hand
//! (`rust/src/ffi.rs` for the glue's services, `#[no_mangle] extern "C"`
//! definitions in `rust/src/lib.rs` for its entry points) and the Makefile
//! lists the entry points the object exports. The unit test here keeps the
//! four in step: same functions, same number of parameters, and a C
//! definition for every service.

use std::collections::BTreeMap;

/// Parameter count of a parameter list (the text between the outer
/// parentheses): top-level commas, so function-pointer parameters count once;
/// `void` and empty lists count 0.
fn param_count(list: &str) -> usize {
    let t = list.trim();
    if t.is_empty() || t == "void" {
        return 0;
    }
    let mut depth = 0i32;
    let mut n = 1;
    for c in t.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => n += 1,
            _ => {}
        }
    }
    n
}

/// The parameter list of the call-like text starting at `name(`: up to the
/// matching parenthesis.
fn params_after(text: &str, name_end: usize) -> Option<&str> {
    let rest = &text[name_end..];
    let rest = rest.strip_prefix('(')?;
    let mut depth = 1;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Every `prefix*` identifier in `text` for which `keep(line)` holds, followed
/// by `(`, with its parameter count. Lines are judged by `keep` so callers can
/// tell declarations from calls.
fn functions(text: &str, prefix: &str, keep: impl Fn(&str) -> bool) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if keep(line) {
            let mut from = 0;
            while let Some(p) = line[from..].find(prefix) {
                let start = from + p;
                let name_len = line[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(0);
                let name = &line[start..start + name_len];
                let before_ok = start == 0 || !line.as_bytes()[start - 1].is_ascii_alphanumeric();
                if before_ok {
                    if let Some(params) = params_after(text, offset + start + name_len) {
                        out.insert(name.to_string(), param_count(params));
                        break;
                    }
                }
                from = start + name_len.max(1);
            }
        }
        offset += line.len();
    }
    out
}

/// (header glue services, header Rust entry points) from `kdbt_glue.h`.
fn header(text: &str) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let decl = |l: &str| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*");
    (functions(text, "kdbt_glue_", decl), functions(text, "kdbt_rs_", decl))
}

/// `kdbt_rs_*` names in the Makefile's RUST_EXPORTS list.
fn makefile_exports(text: &str) -> Vec<String> {
    let Some(at) = text.find("RUST_EXPORTS :=") else { return Vec::new() };
    let mut names = Vec::new();
    for line in text[at + "RUST_EXPORTS :=".len()..].lines() {
        names.extend(line.split_whitespace().filter(|w| w.starts_with("kdbt_rs_")).map(str::to_string));
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::workspace_root;

    fn read(rel: &str) -> String {
        std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    #[test]
    fn parameter_lists_are_counted_at_top_level() {
        assert_eq!(param_count("void"), 0);
        assert_eq!(param_count(""), 0);
        assert_eq!(param_count("unsigned int cpu, void (*fn)(void *), void *arg"), 3);
        assert_eq!(param_count("cpu: c_uint, func: unsafe extern \"C\" fn(*mut c_void), arg: *mut c_void"), 3);
        let f = functions("int kdbt_rs_x(int a,\n  long b);\n", "kdbt_rs_", |_| true);
        assert_eq!(f.get("kdbt_rs_x"), Some(&2));
    }

    #[test]
    fn glue_header_rust_side_and_exports_agree() {
        let (h_glue, h_rs) = header(&read("loader/module/kdbt_glue.h"));
        assert!(h_glue.len() >= 10 && h_rs.len() >= 5, "header parsed: {h_glue:?} {h_rs:?}");

        let ffi = functions(&read("loader/module/rust/src/ffi.rs"), "kdbt_glue_", |l| l.contains("pub fn "));
        assert_eq!(ffi, h_glue, "rust/src/ffi.rs must declare exactly the header's kdbt_glue_* services");

        let lib = functions(&read("loader/module/rust/src/lib.rs"), "kdbt_rs_", |l| l.contains("extern \"C\" fn "));
        assert_eq!(lib, h_rs, "rust/src/lib.rs must define exactly the header's kdbt_rs_* entry points");

        let mut exports = makefile_exports(&read("loader/module/Makefile"));
        exports.sort();
        assert_eq!(exports, h_rs.keys().cloned().collect::<Vec<_>>(), "Makefile RUST_EXPORTS vs the header");

        // Every service has a C definition with the declared parameter count.
        let def = |l: &str| !l.starts_with(char::is_whitespace) && !l.trim_end().ends_with(';');
        let mut glue_c = functions(&read("loader/module/kdbt_glue.c"), "kdbt_glue_", def);
        glue_c.extend(functions(&read("loader/module/kdbt_dbt.c"), "kdbt_glue_", def));
        for (name, n) in &h_glue {
            assert_eq!(glue_c.get(name), Some(n), "kdbt_glue.c / kdbt_dbt.c: definition of {name}");
        }
    }
}
