//! The pinned Rust toolchain's targets and components, made sure of before any build.
//!
//! rustup installs `rust-toolchain.toml`'s `targets` and `components` only when it installs
//! the toolchain itself: on a machine where the pinned version was already there (without,
//! say, the musl target), a build for that target fails with `can't find crate for core`.
//! So every xtask command that builds for the kernel or the guest checks them here and adds
//! the missing ones with rustup, saying what it installs.

use crate::util::{note, step, workspace_root};
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// What `rust-toolchain.toml` pins: the channel and the targets and components it lists.
#[derive(Debug, PartialEq, Eq)]
pub struct Pinned {
    pub channel: String,
    pub targets: Vec<String>,
    pub components: Vec<String>,
}

/// Parses the `[toolchain]` table of a `rust-toolchain.toml` (`channel = "..."`,
/// `targets = [..]`, `components = [..]`, each on one line, as rustup writes them).
pub fn parse(text: &str) -> Result<Pinned> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let list = |key: &str| -> Vec<String> {
        value(key)
            .map(|v| {
                v.trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    };
    let channel = value("channel").context("rust-toolchain.toml has no `channel`")?.trim_matches('"').to_string();
    if channel.is_empty() {
        bail!("rust-toolchain.toml has an empty `channel`");
    }
    Ok(Pinned { channel, targets: list("targets"), components: list("components") })
}

/// Lines of `rustup <what> list --installed --toolchain <channel>`.
fn installed(what: &str, channel: &str) -> Result<Vec<String>> {
    let out = Command::new("rustup")
        .args([what, "list", "--installed", "--toolchain", channel])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run rustup (kdbt's builds need rustup and the toolchain rust-toolchain.toml pins)")?;
    if !out.status.success() {
        bail!("`rustup {what} list --installed --toolchain {channel}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).collect())
}

/// True if rustup's installed list has `name` (components are listed with the host triple
/// appended, e.g. `rust-src` or `clippy-x86_64-unknown-linux-gnu`).
fn listed(list: &[String], name: &str) -> bool {
    list.iter().any(|l| {
        l == name
            || l.strip_prefix(name).and_then(|r| r.strip_prefix('-')).is_some_and(|triple| triple.contains("-unknown-"))
    })
}

/// Adds the pinned toolchain's missing targets and components.
pub fn ensure() -> Result<()> {
    let path = workspace_root().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let p = parse(&text)?;
    for (what, wanted) in [("target", &p.targets), ("component", &p.components)] {
        let have = installed(what, &p.channel)?;
        let missing: Vec<&str> = wanted.iter().filter(|w| !listed(&have, w)).map(|s| s.as_str()).collect();
        if missing.is_empty() {
            continue;
        }
        step(format!("rustup: adding {what}s {} to toolchain {}", missing.join(" "), p.channel));
        let st = Command::new("rustup")
            .args([what, "add", "--toolchain", &p.channel])
            .args(&missing)
            .status()
            .context("cannot run rustup")?;
        if !st.success() {
            bail!(
                "rustup could not add {what}s {} (try: rustup {what} add --toolchain {} {})",
                missing.join(" "),
                p.channel,
                missing.join(" ")
            );
        }
    }
    note(format!(
        "toolchain {}: targets {} and components {} present",
        p.channel,
        p.targets.join(" "),
        p.components.join(" ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_projects_file() {
        let p = parse(&std::fs::read_to_string(workspace_root().join("rust-toolchain.toml")).unwrap()).unwrap();
        assert!(!p.channel.is_empty());
        assert!(p.targets.iter().any(|t| t == "x86_64-unknown-linux-musl"));
        assert!(p.targets.iter().any(|t| t == "x86_64-unknown-none"));
        assert!(p.components.iter().any(|c| c == "rust-src"));
    }

    #[test]
    fn parses_lists_and_missing_keys() {
        let p = parse("[toolchain]\nchannel = \"1.2.3\"\ntargets = [\"a\", \"b-c\"]\n").unwrap();
        assert_eq!(p, Pinned { channel: "1.2.3".into(), targets: vec!["a".into(), "b-c".into()], components: vec![] });
        assert!(parse("[toolchain]\ntargets = []\n").is_err());
    }

    #[test]
    fn component_names_match_with_the_host_suffix() {
        let have = vec!["rust-src".to_string(), "clippy-x86_64-unknown-linux-gnu".to_string()];
        assert!(listed(&have, "rust-src"));
        assert!(listed(&have, "clippy"));
        assert!(!listed(&have, "rustfmt"));
        assert!(!listed(&have, "rust"));
        assert!(!listed(&["x86_64-unknown-linux-gnu".to_string()], "x86_64-unknown-linux-musl"));
    }
}
