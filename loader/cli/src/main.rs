//! `kdbt`: the command-line front end of the kdbt kernel module.
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use vmx::caps::{RawCaps, VmxCaps};

mod device;

#[derive(Parser)]
#[command(name = "kdbt", version, about = "kdbt: VT-x late launch and kernel dynamic binary translation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show each online CPU's VT-x capabilities, as read from its MSRs by the module.
    Caps {
        /// One line per CPU of key=value pairs (for scripts).
        #[arg(long, conflicts_with = "json")]
        summary: bool,
        /// JSON: per CPU, the raw MSR values and the decoded summary.
        #[arg(long)]
        json: bool,
    },
    /// Show the versions of the CLI and of the loaded module.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kdbt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Caps { summary, json } => caps(summary, json),
        Cmd::Version => {
            let v = device::Device::open()?.version()?;
            println!("kdbt CLI {} (ABI {})", env!("CARGO_PKG_VERSION"), kdbt_abi::ABI_VERSION);
            println!(
                "kdbt module {} (ABI {}), {} of {} CPUs online",
                kdbt_abi::fixed_str_read(&v.module_version),
                v.abi_version,
                v.cpus_online,
                v.cpu_ids
            );
            Ok(())
        }
    }
}

fn caps(summary: bool, json: bool) -> Result<()> {
    let raws: Vec<RawCaps> = device::Device::open()?.caps()?;
    if json {
        let cpus: Vec<serde_json::Value> = raws.iter().map(caps_json).collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "cpus": cpus }))?);
        return Ok(());
    }
    for raw in &raws {
        let caps = VmxCaps::decode(raw);
        if summary {
            println!("{}", caps.summary());
        } else {
            print!("{caps}");
            println!();
        }
    }
    Ok(())
}

/// Raw MSR values (as hex strings, null when the read faulted) plus the decoded summary.
fn caps_json(raw: &RawCaps) -> serde_json::Value {
    let caps = VmxCaps::decode(raw);
    let mut msrs = serde_json::Map::new();
    for (name, msr, value) in raw.msrs() {
        msrs.insert(
            name.to_string(),
            serde_json::json!({
                "msr": format!("{msr:#x}"),
                "value": value.map(|v| format!("{v:#018x}")),
            }),
        );
    }
    let mut summary = serde_json::Map::new();
    for kv in caps.summary().split_whitespace() {
        if let Some((k, v)) = kv.split_once('=') {
            let v = v.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| v.into());
            summary.insert(k.to_string(), v);
        }
    }
    serde_json::json!({ "summary": summary, "msrs": msrs })
}
