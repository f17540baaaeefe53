//! Applying and removing the rules: choosing the iptables backend inside the
//! current network namespace, reading the nat table with `iptables-save`, and
//! feeding `iptables-restore --noflush` one transaction per family.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::Regex;

use super::IptablesError;
use super::rules::{CHAIN_PREFIX, CHAINS, Family, RuleSet};

/// How long one `iptables-save` / `iptables-restore` may run before it is killed.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `iptables-restore` waits for the xtables lock (legacy backend).
const LOCK_WAIT_SECS: u32 = 5;

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Decide inside the current network namespace: `iptables-legacy` when its
    /// tables hold rules and the nf_tables ones do not, else plain `iptables`.
    Auto,
    /// `iptables-legacy-restore` / `iptables-legacy-save` (x_tables).
    Legacy,
    /// `iptables-nft-restore` / `iptables-nft-save` (nf_tables).
    Nft,
}

/// The restore and save programs for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// The family they handle.
    pub family: Family,
    /// e.g. `iptables-restore`.
    pub restore: String,
    /// e.g. `iptables-save`.
    pub save: String,
}

fn base(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

impl Tools {
    /// The plain `iptables-restore` / `iptables-save` (whatever backend the
    /// system's `iptables` is).
    pub fn default_for(family: Family) -> Tools {
        let b = base(family);
        Tools { family, restore: format!("{b}-restore"), save: format!("{b}-save") }
    }

    fn variant(family: Family, variant: &str) -> Tools {
        let b = base(family);
        Tools { family, restore: format!("{b}-{variant}-restore"), save: format!("{b}-{variant}-save") }
    }

    /// Chooses the programs for `family`. `Auto` looks at the current network
    /// namespace (the pod's: never decide from another one): legacy when
    /// `iptables-legacy-save` shows rules and `iptables-nft-save` does not.
    pub fn select(backend: Backend, family: Family) -> Tools {
        match backend {
            Backend::Legacy => Tools::variant(family, "legacy"),
            Backend::Nft => Tools::variant(family, "nft"),
            Backend::Auto => {
                let legacy = Tools::variant(family, "legacy");
                let nft = Tools::variant(family, "nft");
                let legacy_rules = has_rules(&legacy.save);
                let nft_rules = has_rules(&nft.save);
                tracing::debug!(%family, legacy_rules, nft_rules, "iptables backend detection");
                if legacy_rules && !nft_rules && find_program(&legacy.restore).is_some() {
                    tracing::info!(%family, "rules present in the legacy tables only: using {}", legacy.restore);
                    legacy
                } else {
                    Tools::default_for(family)
                }
            }
        }
    }

    /// Fails when the restore or save program is not in `PATH`.
    pub fn check_installed(&self) -> Result<(), IptablesError> {
        for tool in [&self.restore, &self.save] {
            if find_program(tool).is_none() {
                return Err(IptablesError::ToolMissing { family: self.family, tool: tool.clone() });
            }
        }
        Ok(())
    }

    /// Whether both programs are in `PATH`.
    pub fn installed(&self) -> bool {
        self.check_installed().is_ok()
    }
}

/// Whether `save` (an `iptables-save` variant) runs and prints at least one rule
/// or user-defined chain. A failing or missing program counts as "no rules".
fn has_rules(save: &str) -> bool {
    if find_program(save).is_none() {
        return false;
    }
    match run_tool(save, &[], None) {
        Ok(out) if out.status.success() => {
            out.stdout.lines().any(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - [")))
        }
        Ok(out) => {
            tracing::debug!(tool = save, stderr = %out.stderr.trim(), "cannot list rules");
            false
        }
        Err(e) => {
            tracing::debug!(tool = save, error = %e, "cannot list rules");
            false
        }
    }
}

/// Looks `name` up in `PATH` (or takes it as a path when it has a `/`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = Path::new(name);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// What a finished tool printed.
#[derive(Debug)]
pub struct ToolOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `program args`, feeding `stdin`, killed after [`TOOL_TIMEOUT`].
fn run_tool(program: &str, args: &[&str], stdin: Option<&str>) -> Result<ToolOutput, IptablesError> {
    let spawn_err = |source| IptablesError::Spawn { tool: program.to_string(), source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let writer = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(input)) => {
            let input = input.to_string();
            // A tool that exits early closes the pipe: its exit status tells why.
            Some(std::thread::spawn(move || drop(pipe.write_all(input.as_bytes()))))
        }
        _ => None,
    };
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                drop(pipe.read_to_end(&mut bytes));
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(spawn_err)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                drop(child.kill());
                drop(child.wait());
                return Err(IptablesError::Timeout { tool: program.to_string(), secs: TOOL_TIMEOUT.as_secs() });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    if let Some(w) = writer {
        drop(w.join());
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(ToolOutput { status, stdout, stderr })
}

/// serin's part of a nat table, as `iptables-save` printed it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NatState {
    /// `SERIN_*` chains, in the order listed.
    pub chains: Vec<String>,
    /// Rules of other chains that jump to a `SERIN_*` chain (`-A OUTPUT … -j SERIN_OUTPUT`).
    pub jumps: Vec<String>,
    /// The rules of each `SERIN_*` chain, in order.
    pub rules: BTreeMap<String, Vec<String>>,
}

impl NatState {
    /// Parses the `*nat` section of `iptables-save` output.
    pub fn parse(save: &str) -> NatState {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if line == "COMMIT" {
                in_nat = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    state.chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or_default();
                if chain.starts_with(CHAIN_PREFIX) {
                    state.rules.entry(chain.to_string()).or_default().push(line.to_string());
                } else if jumps_to_serin(line) {
                    state.jumps.push(line.to_string());
                }
            }
        }
        state
    }

    /// The state `rules` leaves behind, to compare with what is in place.
    pub fn of(rules: &RuleSet) -> NatState {
        let mut state = NatState { chains: CHAINS.iter().map(|c| c.to_string()).collect(), ..NatState::default() };
        for rule in &rules.rules {
            if rule.chain.starts_with(CHAIN_PREFIX) {
                state.rules.entry(rule.chain.to_string()).or_default().push(rule.to_string());
            } else {
                state.jumps.push(rule.to_string());
            }
        }
        state
    }

    /// Whether nothing of serin's is in the table.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty() && self.rules.is_empty()
    }

    /// Same chains, same jumps and the same rules per chain (the order of chains
    /// and of jumps among other rules does not matter).
    pub fn same_as(&self, other: &NatState) -> bool {
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        fn rules(s: &NatState) -> Vec<(&String, &Vec<String>)> {
            s.rules.iter().filter(|(_, r)| !r.is_empty()).collect()
        }
        sorted(&self.chains) == sorted(&other.chains)
            && sorted(&self.jumps) == sorted(&other.jumps)
            && rules(self) == rules(other)
    }

    /// `-D` lines removing the jumps into serin's chains.
    fn delete_jumps(&self) -> String {
        self.jumps.iter().filter_map(|j| j.strip_prefix("-A ")).map(|spec| format!("-D {spec}\n")).collect()
    }
}

/// Whether a rule's target (`-j`) or goto (`-g`) is a `SERIN_*` chain.
fn jumps_to_serin(line: &str) -> bool {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if (w == "-j" || w == "-g" || w == "--jump" || w == "--goto")
            && words.next().is_some_and(|t| t.starts_with(CHAIN_PREFIX))
        {
            return true;
        }
    }
    false
}

/// Reads the nat table with `tools.save`; `consequence` says, on failure, what
/// was therefore not done.
pub fn read_state(tools: &Tools, consequence: &str) -> Result<NatState, IptablesError> {
    let out = run_tool(&tools.save, &["-t", "nat"], None)?;
    if !out.status.success() {
        return Err(IptablesError::ReadFailed {
            family: tools.family,
            tool: tools.save.clone(),
            status: out.status.to_string(),
            stderr: one_line(&out.stderr),
            hint: hint(&out.stderr),
            consequence: consequence.to_string(),
        });
    }
    Ok(NatState::parse(&out.stdout))
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The rules were written (`replaced`: earlier serin rules were replaced).
    Written {
        /// Whether serin rules were in place before.
        replaced: bool,
    },
    /// Exactly these rules were in place already: nothing was changed.
    AlreadyInPlace,
}

/// The `iptables-restore --noflush` input that replaces whatever serin put in
/// the table before with `rules`, in one transaction: delete the old jumps,
/// declare (flush) serin's chains, drop stale `SERIN_*` chains, append the rules.
pub fn replacement_input(current: &NatState, rules: &RuleSet) -> String {
    let mut out = String::from("*nat\n");
    out.push_str(&current.delete_jumps());
    out.push_str(&rules.chain_declarations());
    let stale: Vec<&String> = current.chains.iter().filter(|c| !CHAINS.contains(&c.as_str())).collect();
    for chain in &stale {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &stale {
        out.push_str(&format!("-X {chain}\n"));
    }
    for rule in &rules.rules {
        out.push_str(&format!("{rule}\n"));
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input removing serin's jumps and chains;
/// `None` when there is nothing to remove.
pub fn cleanup_input(current: &NatState) -> Option<String> {
    if current.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    out.push_str(&current.delete_jumps());
    for chain in &current.chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &current.chains {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Puts `rules` in place with `tools`, replacing earlier serin rules; does
/// nothing when exactly these rules are in place.
pub fn apply(tools: &Tools, rules: &RuleSet) -> Result<Applied, IptablesError> {
    tools.check_installed()?;
    let first_rule = rules.rules.first().map(ToString::to_string).unwrap_or_default();
    let current = read_state(tools, &format!("no rule was applied (the first would have been `{first_rule}`)"))?;
    if current.same_as(&NatState::of(rules)) {
        return Ok(Applied::AlreadyInPlace);
    }
    restore(tools, &replacement_input(&current, rules))?;
    Ok(Applied::Written { replaced: !current.is_empty() })
}

/// Removes serin's jumps and chains with `tools`; returns how many chains went.
/// `dry_run` prints what would be fed to `iptables-restore` instead.
pub fn cleanup(tools: &Tools, dry_run: Option<&mut dyn Write>) -> Result<usize, IptablesError> {
    tools.check_installed()?;
    let current = read_state(tools, "nothing was removed")?;
    let Some(input) = cleanup_input(&current) else { return Ok(0) };
    match dry_run {
        Some(out) => {
            let header = format!("# {}: {} --noflush\n", tools.family, tools.restore);
            drop(out.write_all(header.as_bytes()).and_then(|()| out.write_all(input.as_bytes())));
        }
        None => restore(tools, &input)?,
    }
    Ok(current.chains.len())
}

/// Feeds `input` to `iptables-restore --noflush`; a failure names the rejected
/// line of `input` when the tool reports one.
pub fn restore(tools: &Tools, input: &str) -> Result<(), IptablesError> {
    let wait = format!("--wait={LOCK_WAIT_SECS}");
    let out = run_tool(&tools.restore, &["--noflush", &wait], Some(input))?;
    if out.status.success() {
        return Ok(());
    }
    Err(restore_error(tools, input, &out.status.to_string(), &out.stderr))
}

static LINE_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\bline:?\s*(\d+)").expect("a valid static regex"));

/// Maps a failed `iptables-restore` run back to the line of `input` it
/// rejected (`Error occurred at line: N`, `line N failed`, `line N: …`).
pub fn restore_error(tools: &Tools, input: &str, status: &str, stderr: &str) -> IptablesError {
    let line = LINE_NUMBER.captures(stderr).and_then(|c| c.get(1)).and_then(|m| m.as_str().parse::<usize>().ok());
    let text = line.and_then(|n| n.checked_sub(1)).and_then(|i| input.lines().nth(i));
    match (line, text) {
        (Some(line), Some(text)) => {
            let rule = if text == "COMMIT" {
                "COMMIT (the kernel refused the table as a whole: one of the rules above is not supported)".to_string()
            } else {
                text.to_string()
            };
            IptablesError::RuleRejected {
                family: tools.family,
                tool: tools.restore.clone(),
                line,
                rule,
                stderr: one_line(stderr),
                hint: hint(stderr),
            }
        }
        _ => IptablesError::RestoreFailed {
            family: tools.family,
            tool: tools.restore.clone(),
            status: status.to_string(),
            stderr: one_line(stderr),
            hint: hint(stderr),
            first_rule: input.lines().find(|l| l.starts_with('-')).unwrap_or("*nat").to_string(),
        },
    }
}

/// The tool's complaint on one line, without its usage advice.
fn one_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Try `")).collect();
    if lines.is_empty() { "(no message)".into() } else { lines.join("; ") }
}

/// Advice for the usual cause of a failure.
fn hint(stderr: &str) -> String {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("permission denied") || lower.contains("must be root") || lower.contains("not permitted") {
        " (serin iptables must run as root, or with NET_ADMIN and NET_RAW, in the pod's network namespace)".into()
    } else if lower.contains("table does not exist") || lower.contains("can't initialize") {
        " (the kernel lacks the nat table for this family: load iptable_nat / ip6table_nat)".into()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::rules::{Config, generate};

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-X - [0:0]
:SERIN_INBOUND - [0:0]
:SERIN_OLD - [0:0]
-A PREROUTING -p tcp -j SERIN_INBOUND
-A PREROUTING -j KUBE-X
-A OUTPUT -p tcp -j SERIN_OUTPUT
-A KUBE-X -p tcp -g SERIN_OLD
-A SERIN_INBOUND -p tcp -j RETURN
COMMIT
*filter
:SERIN_FILTER - [0:0]
-A INPUT -j SERIN_FILTER
COMMIT
";

    #[test]
    fn save_output_is_read_for_serin_chains_and_jumps_in_nat_only() {
        let s = NatState::parse(SAVED);
        assert_eq!(s.chains, ["SERIN_INBOUND", "SERIN_OLD"]);
        assert_eq!(
            s.jumps,
            [
                "-A PREROUTING -p tcp -j SERIN_INBOUND",
                "-A OUTPUT -p tcp -j SERIN_OUTPUT",
                "-A KUBE-X -p tcp -g SERIN_OLD"
            ]
        );
        assert_eq!(s.rules.get("SERIN_INBOUND").map(Vec::len), Some(1));
    }

    #[test]
    fn cleanup_deletes_the_jumps_then_flushes_then_deletes_the_chains() {
        let input = cleanup_input(&NatState::parse(SAVED)).expect("something to clean");
        assert_eq!(
            input,
            "*nat\n-D PREROUTING -p tcp -j SERIN_INBOUND\n-D OUTPUT -p tcp -j SERIN_OUTPUT\n-D KUBE-X -p tcp -g SERIN_OLD\n\
             -F SERIN_INBOUND\n-F SERIN_OLD\n-X SERIN_INBOUND\n-X SERIN_OLD\nCOMMIT\n"
        );
        assert_eq!(cleanup_input(&NatState::default()), None);
    }

    #[test]
    fn replacing_removes_old_jumps_and_stale_chains_in_the_same_transaction() {
        let rules = generate(&Config::default(), Family::V4);
        let input = replacement_input(&NatState::parse(SAVED), &rules);
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "*nat",
                "-D PREROUTING -p tcp -j SERIN_INBOUND",
                "-D OUTPUT -p tcp -j SERIN_OUTPUT",
                "-D KUBE-X -p tcp -g SERIN_OLD"
            ]
        );
        assert_eq!(
            lines[4..8],
            [
                ":SERIN_INBOUND - [0:0]",
                ":SERIN_REDIRECT - [0:0]",
                ":SERIN_IN_REDIRECT - [0:0]",
                ":SERIN_OUTPUT - [0:0]"
            ]
        );
        assert_eq!(lines[8..10], ["-F SERIN_OLD", "-X SERIN_OLD"]);
        assert_eq!(lines.len(), 10 + rules.rules.len() + 1);
        // A fresh table: just the rules.
        assert_eq!(replacement_input(&NatState::default(), &rules), rules.restore_input());
    }

    #[test]
    fn the_generated_rules_match_themselves_as_saved() {
        let rules = generate(&Config::default(), Family::V6);
        // iptables-save lists the built-in chains' rules first and the user chains sorted.
        let mut saved = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        let mut chains: Vec<&str> = CHAINS.to_vec();
        chains.sort();
        for c in &chains {
            saved.push_str(&format!(":{c} - [0:0]\n"));
        }
        for chain in ["PREROUTING", "OUTPUT"].iter().chain(chains.iter()) {
            for r in rules.rules.iter().filter(|r| r.chain == *chain) {
                saved.push_str(&format!("{r}\n"));
            }
        }
        saved.push_str("COMMIT\n");
        assert!(NatState::parse(&saved).same_as(&NatState::of(&rules)));
        let other = generate(&Config { proxy_port: 15002, ..Config::default() }, Family::V6);
        assert!(!NatState::parse(&saved).same_as(&NatState::of(&other)));
    }

    fn tools() -> Tools {
        Tools::default_for(Family::V4)
    }

    #[test]
    fn a_rejected_line_is_named_nft() {
        let input =
            "*nat\n:SERIN_X - [0:0]\n-A SERIN_X -p tcp -j RETURN\n-A SERIN_X -p tcp --dport 99999 -j RETURN\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (nf_tables): invalid port/service `99999' specified\n\
                      Error occurred at line: 4\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        let e = restore_error(&tools(), input, "exit status: 2", stderr);
        let msg = e.to_string();
        assert!(matches!(e, IptablesError::RuleRejected { line: 4, .. }), "{msg}");
        assert!(msg.contains("line 4") && msg.contains("`-A SERIN_X -p tcp --dport 99999 -j RETURN`"), "{msg}");
        assert!(msg.contains("invalid port/service"), "{msg}");
        assert!(!msg.contains("Try `"), "{msg}");
    }

    #[test]
    fn a_rejected_line_is_named_nft_commit_time() {
        let input = "*filter\n:SERIN_F - [0:0]\n-A SERIN_F -p tcp -j RETURN\n-A SERIN_F -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (nf_tables): \nline 4: RULE_APPEND failed (Invalid argument): rule in chain SERIN_F\n";
        let msg = restore_error(&tools(), input, "exit status: 4", stderr).to_string();
        assert!(msg.contains("line 4") && msg.contains("`-A SERIN_F -p tcp -j REDIRECT --to-ports 15001`"), "{msg}");
    }

    #[test]
    fn a_legacy_commit_failure_says_the_table_was_refused() {
        let input = "*filter\n:SERIN_F - [0:0]\n-A SERIN_F -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let msg = restore_error(&tools(), input, "exit status: 1", "iptables-restore: line 4 failed\n").to_string();
        assert!(msg.contains("line 4") && msg.contains("COMMIT (the kernel refused the table as a whole"), "{msg}");
    }

    #[test]
    fn no_permission_names_the_first_rule_and_the_cause() {
        let input = "*nat\n:SERIN_X - [0:0]\n-A SERIN_X -p tcp -j RETURN\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n";
        let e = restore_error(&tools(), input, "exit status: 4", stderr);
        let msg = e.to_string();
        assert!(matches!(e, IptablesError::RestoreFailed { .. }), "{msg}");
        assert!(msg.contains("`-A SERIN_X -p tcp -j RETURN`") && msg.contains("NET_ADMIN"), "{msg}");
    }

    #[test]
    fn jumps_are_recognised_by_target_only() {
        assert!(jumps_to_serin("-A OUTPUT -p tcp -j SERIN_OUTPUT"));
        assert!(jumps_to_serin("-A OUTPUT -g SERIN_OUTPUT"));
        assert!(!jumps_to_serin("-A OUTPUT -m comment --comment SERIN_OUTPUT -j RETURN"));
    }
}
