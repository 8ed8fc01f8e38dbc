//! Prints the hypervisor CPUID signature seen on one CPU and checks it against an
//! expectation. Usage: cpuid-sig [--cpu N] [--expect kdbt|none]
//! Exit status: 0 when the expectation holds (or none was given), 1 when it does not,
//! 2 on a usage or pinning error.
use kdbt_guest::{cpuid, current_cpu, hypervisor_signature, pin_to_cpu, Hypervisor};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cpu = None;
    let mut expect = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--cpu", Some(v)) => cpu = v.parse::<usize>().ok().or_else(usage),
            ("--expect", Some(v)) if v == "kdbt" || v == "none" => expect = Some(v.clone()),
            _ => {
                usage();
            }
        }
    }
    if let Some(c) = cpu {
        if let Err(e) = pin_to_cpu(c) {
            eprintln!("cpuid-sig: cannot pin to cpu{c}: {e}");
            std::process::exit(2);
        }
    }
    let on = current_cpu();
    let hv = hypervisor_signature();
    let kdbt = hv.is_kdbt();
    match &hv {
        Hypervisor::None => println!("cpu={on} no hypervisor"),
        Hypervisor::Vendor { max_leaf, vendor } if kdbt => {
            let info = cpuid(0x4000_0001, 0);
            println!(
                "cpu={on} sig={vendor} max_leaf={max_leaf:#x} version={} state={:#x} kdbt_cpu={}",
                info[0], info[1], info[2]
            );
        }
        Hypervisor::Vendor { max_leaf, vendor } => {
            println!("cpu={on} sig={vendor} max_leaf={max_leaf:#x}")
        }
    }
    let ok = match expect.as_deref() {
        Some("kdbt") => kdbt,
        Some(_) => !kdbt,
        None => true,
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn usage() -> Option<usize> {
    eprintln!("usage: cpuid-sig [--cpu N] [--expect kdbt|none]");
    std::process::exit(2);
}
