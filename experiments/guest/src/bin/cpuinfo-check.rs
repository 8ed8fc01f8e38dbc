//! cpuinfo-check: how many CPUs are online, and CPUID.1:ECX.VMX (bit 5) on each, read by
//! pinning this thread to every online CPU in turn.
//!
//! Output: `online=<n> list=<sysfs list>` then one `cpu=<n> vmx=<0|1>` line per CPU.
//! `--expect-cpus N` / `--expect-vmx 0|1` make it exit 1 on a mismatch.

use kdbt_guest::{cpuid, current_cpu, pin_to_cpu};
use std::process::ExitCode;

/// Parses a sysfs CPU list such as `0-3,5,7-8`.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                v.extend(a..=b);
            }
            None => v.push(part.parse().ok()?),
        }
    }
    Some(v)
}

fn usage() -> ExitCode {
    eprintln!("usage: cpuinfo-check [--expect-cpus N] [--expect-vmx 0|1]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut expect_cpus: Option<usize> = None;
    let mut expect_vmx: Option<bool> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--expect-cpus" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => expect_cpus = Some(n),
                None => return usage(),
            },
            "--expect-vmx" => match args.next().as_deref() {
                Some("0") => expect_vmx = Some(false),
                Some("1") => expect_vmx = Some(true),
                _ => return usage(),
            },
            _ => return usage(),
        }
    }

    let raw = match std::fs::read_to_string("/sys/devices/system/cpu/online") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot read /sys/devices/system/cpu/online: {e}");
            return ExitCode::from(1);
        }
    };
    let Some(cpus) = parse_cpu_list(&raw) else {
        eprintln!("cannot parse online CPU list {:?}", raw.trim());
        return ExitCode::from(1);
    };
    println!("online={} list={}", cpus.len(), raw.trim());

    let mut ok = true;
    for &c in &cpus {
        if let Err(e) = pin_to_cpu(c) {
            println!("cpu={c} error=pin:{e}");
            ok = false;
            continue;
        }
        let on = current_cpu();
        let vmx = cpuid(1, 0)[2] & (1 << 5) != 0;
        println!("cpu={c} ran_on={on} vmx={}", u8::from(vmx));
        if on != c as i32 {
            ok = false;
        }
        if expect_vmx.is_some_and(|want| want != vmx) {
            ok = false;
        }
    }
    if let Some(n) = expect_cpus {
        if n != cpus.len() {
            println!("expected {n} online CPUs, found {}", cpus.len());
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
