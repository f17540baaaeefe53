//! `serin iptables`: the init step of a pod, like Istio's `istio-iptables`
//! (`istio-init`). It writes nat rules that send the pod's outbound TCP to the
//! sidecar's outbound port (15001) and its inbound TCP to the inbound capture port
//! (15006), sparing the proxy's own traffic (uid/gid 1337), loopback and the
//! excluded addresses and ports. The rules go in with `iptables-restore --noflush`
//! (and `ip6tables-restore`), one transaction per family; `--dry-run` prints them,
//! `--cleanup` removes them, and a second run replaces or keeps them, never adds
//! duplicates.
//!
//! See `docs/interception.md` for the rules and what each one does.

pub mod apply;
pub mod rules;

use std::fmt;
use std::io::Write;
use std::str::FromStr;

pub use apply::{Applied, Backend, Tools};
pub use rules::{Cidr, Cidrs, Config, Family, Ids, InboundPorts, OutboundCidrs, Ports, RuleSet, generate};

/// Why `serin iptables` failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// A flag value that cannot be used.
    #[error("invalid {flag}: {reason}")]
    InvalidFlag {
        /// The flag, e.g. `-p/--proxy-port`.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `iptables-restore` or `iptables-save` is not installed.
    #[error("{family}: `{tool}` was not found in PATH (install the iptables package); no rule was applied")]
    ToolMissing {
        /// The family that needed it.
        family: Family,
        /// The missing program.
        tool: String,
    },
    /// A program could not be started or waited for.
    #[error("cannot run `{tool}`: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--dry-run` could not write to stdout.
    #[error("cannot print the rules: {0}")]
    Print(#[source] std::io::Error),
    /// A program ran too long and was killed.
    #[error("`{tool}` did not finish within {secs} s and was killed")]
    Timeout {
        /// The program.
        tool: String,
        /// The limit.
        secs: u64,
    },
    /// `iptables-save` failed, so the rules in place are unknown.
    #[error("{family}: cannot read the nat table with `{tool} -t nat` ({status}): {stderr}{hint}; {consequence}")]
    ReadFailed {
        /// The family.
        family: Family,
        /// The save program.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its complaint.
        stderr: String,
        /// Advice for the likely cause (may be empty).
        hint: String,
        /// What was therefore not done.
        consequence: String,
    },
    /// `iptables-restore` rejected one line of the input: nothing of that
    /// transaction was applied.
    #[error("{family}: `{tool}` rejected line {line}: `{rule}`: {stderr}{hint}; no rule of this family was changed")]
    RuleRejected {
        /// The family.
        family: Family,
        /// The restore program.
        tool: String,
        /// The 1-based line of the input.
        line: usize,
        /// The text of that line.
        rule: String,
        /// The tool's complaint.
        stderr: String,
        /// Advice for the likely cause (may be empty).
        hint: String,
    },
    /// `iptables-restore` failed without naming a line (no permission, …).
    #[error("{family}: `{tool}` failed ({status}): {stderr}{hint}; no rule was applied (the first was `{first_rule}`)")]
    RestoreFailed {
        /// The family.
        family: Family,
        /// The restore program.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its complaint.
        stderr: String,
        /// Advice for the likely cause (may be empty).
        hint: String,
        /// The first rule of the input.
        first_rule: String,
    },
}

/// How inbound traffic is captured: REDIRECT only (Istio's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptionMode {
    /// nat-table `REDIRECT`; the original destination is read with `SO_ORIGINAL_DST`.
    Redirect,
}

impl FromStr for InterceptionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<InterceptionMode, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "REDIRECT" => Ok(InterceptionMode::Redirect),
            "TPROXY" => Err("TPROXY is not supported: serin captures with REDIRECT only (the default)".into()),
            _ => Err(format!("`{s}` is not an interception mode (REDIRECT)")),
        }
    }
}

impl fmt::Display for InterceptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDIRECT")
    }
}

/// Whether to write IPv6 rules too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// When the kernel has IPv6 and `ip6tables-restore` is installed (`--dry-run` prints them).
    Auto,
    /// Always; a failure is an error.
    On,
    /// Never.
    Off,
}

/// `serin iptables`: the flags mirror `istio-iptables` (same short names; the
/// Istio long names are accepted as aliases).
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// Port the outbound TCP of the pod is redirected to (the sidecar's outbound listener).
    #[arg(short = 'p', long, alias = "envoy-port", value_name = "PORT", default_value_t = rules::DEFAULT_PROXY_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,
    /// Port the inbound TCP of the pod is redirected to (the sidecar's inbound listener).
    #[arg(short = 'z', long, value_name = "PORT", default_value_t = rules::DEFAULT_INBOUND_CAPTURE_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_capture_port: u16,
    /// The proxy's uid(s), comma-separated: their traffic is never captured.
    #[arg(short = 'u', long, value_name = "UIDS", default_value = "1337")]
    pub proxy_uid: Ids,
    /// The proxy's gid(s), comma-separated: their traffic is never captured [default: the uids].
    #[arg(short = 'g', long, value_name = "GIDS")]
    pub proxy_gid: Option<Ids>,
    /// Inbound interception mode: REDIRECT (TPROXY is not supported).
    #[arg(
        short = 'm',
        long,
        alias = "istio-inbound-interception-mode",
        value_name = "MODE",
        default_value = "REDIRECT"
    )]
    pub inbound_interception_mode: InterceptionMode,
    /// Outbound destinations to capture: `*` for all, or CIDR blocks, comma-separated ("" for none).
    #[arg(short = 'i', long, alias = "istio-service-cidr", value_name = "CIDRS", default_value = "*")]
    pub include_outbound_cidrs: OutboundCidrs,
    /// Outbound destinations never captured: CIDR blocks, comma-separated.
    #[arg(short = 'x', long, alias = "istio-service-exclude-cidr", value_name = "CIDRS", default_value = "")]
    pub exclude_outbound_cidrs: Cidrs,
    /// Inbound ports to capture: `*` for all, or ports, comma-separated ("" for none).
    #[arg(short = 'b', long, alias = "istio-inbound-ports", value_name = "PORTS", default_value = "*")]
    pub include_inbound_ports: InboundPorts,
    /// Inbound ports never captured, comma-separated (the proxy's own ports 15000, 15001, 15006, 15020, 15021 and 15090 never are).
    #[arg(short = 'd', long, alias = "istio-local-exclude-ports", value_name = "PORTS", default_value = "")]
    pub exclude_inbound_ports: Ports,
    /// Outbound ports never captured, comma-separated.
    #[arg(short = 'o', long, alias = "istio-local-outbound-ports-exclude", value_name = "PORTS", default_value = "")]
    pub exclude_outbound_ports: Ports,
    /// Outbound ports always captured, whatever the destination, comma-separated.
    #[arg(short = 'q', long, alias = "istio-outbound-ports", value_name = "PORTS", default_value = "")]
    pub include_outbound_ports: Ports,
    /// Whether to write IPv6 rules (ip6tables) too.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
    /// iptables implementation: auto decides inside the current network namespace.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Print the rules (the iptables-restore input) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove serin's rules: the jumps from PREROUTING/OUTPUT and the SERIN_* chains.
    #[arg(long)]
    pub cleanup: bool,
}

impl IptablesArgs {
    /// The validated configuration the flags describe.
    pub fn config(&self) -> Result<Config, IptablesError> {
        if self.proxy_port == self.inbound_capture_port {
            return Err(IptablesError::InvalidFlag {
                flag: "-p/--proxy-port",
                reason: format!(
                    "{} is also the inbound capture port (-z/--inbound-capture-port): they must differ",
                    self.proxy_port
                ),
            });
        }
        let uids = self.proxy_uid.0.clone();
        Ok(Config {
            proxy_port: self.proxy_port,
            inbound_capture_port: self.inbound_capture_port,
            proxy_gids: self.proxy_gid.as_ref().map_or_else(|| uids.clone(), |g| g.0.clone()),
            proxy_uids: uids,
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.0.clone(),
            include_outbound_ports: self.include_outbound_ports.0.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.0.clone(),
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.0.clone(),
        })
    }

    fn families(&self) -> Vec<Family> {
        match self.ipv6 {
            Ipv6Mode::Off => vec![Family::V4],
            Ipv6Mode::Auto | Ipv6Mode::On => Family::ALL.to_vec(),
        }
    }
}

/// The `--dry-run` text: each family's `iptables-restore` input under a comment.
pub fn dry_run_text(config: &Config, families: &[Family]) -> String {
    let mut out = String::new();
    for &family in families {
        let tool = Tools::default_for(family).restore;
        out.push_str(&format!("# serin iptables: {family} nat rules, for `{tool} --noflush`\n"));
        out.push_str(&generate(config, family).restore_input());
    }
    out
}

/// Whether the kernel of this network namespace has IPv6.
fn kernel_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Runs `serin iptables`: prints, applies or removes the rules.
pub fn run(args: &IptablesArgs) -> Result<(), IptablesError> {
    let config = args.config()?;
    let families = args.families();
    if args.dry_run && !args.cleanup {
        let text = dry_run_text(&config, &families);
        let mut stdout = std::io::stdout().lock();
        return stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(IptablesError::Print);
    }
    let mut done: Vec<Family> = Vec::new();
    for family in families {
        let tools = Tools::select(args.backend, family);
        if family == Family::V6 && args.ipv6 == Ipv6Mode::Auto {
            if !kernel_has_ipv6() {
                tracing::info!("IPv6: the kernel has no IPv6 here; skipped (--ipv6 on to insist)");
                continue;
            }
            if !tools.installed() {
                tracing::warn!("IPv6: `{}` is not installed; skipped (--ipv6 on to insist)", tools.restore);
                continue;
            }
        }
        let result = if args.cleanup { cleanup_family(&tools, args.dry_run) } else { apply_family(&tools, &config) };
        if let Err(e) = result {
            if !done.is_empty() {
                let done: Vec<String> = done.iter().map(ToString::to_string).collect();
                tracing::warn!("{} rules were already handled; {family} failed", done.join(", "));
            }
            return Err(e);
        }
        done.push(family);
    }
    Ok(())
}

fn apply_family(tools: &Tools, config: &Config) -> Result<(), IptablesError> {
    let family = tools.family;
    let rules = generate(config, family);
    match apply::apply(tools, &rules)? {
        Applied::AlreadyInPlace => {
            tracing::info!("{family}: the serin rules are already in place; nothing changed ({})", tools.restore)
        }
        Applied::Written { replaced } => tracing::info!(
            "{family}: applied {} nat rules with `{} --noflush`{}",
            rules.rules.len(),
            tools.restore,
            if replaced { ", replacing the earlier serin rules" } else { "" }
        ),
    }
    Ok(())
}

fn cleanup_family(tools: &Tools, dry_run: bool) -> Result<(), IptablesError> {
    let family = tools.family;
    let mut stdout = std::io::stdout();
    let removed = apply::cleanup(tools, if dry_run { Some(&mut stdout) } else { None })?;
    match (removed, dry_run) {
        (0, _) => tracing::info!("{family}: no serin rules to remove ({})", tools.save),
        (n, false) => tracing::info!("{family}: removed the serin jumps and {n} SERIN_* chains ({})", tools.restore),
        (n, true) => tracing::info!("{family}: would remove the serin jumps and {n} SERIN_* chains"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        args: IptablesArgs,
    }

    fn parse(args: &[&str]) -> Result<IptablesArgs, String> {
        Cmd::try_parse_from(std::iter::once("iptables").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn istio_s_injected_flags_give_the_default_config() {
        let args = parse(&[
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
        ])
        .expect("istio's flags");
        let config = args.config().expect("valid");
        assert_eq!(config, Config { exclude_inbound_ports: vec![15090, 15021, 15020], ..Config::default() });
        // The proxy's ports are excluded once.
        assert_eq!(config.inbound_ports_not_captured(), [15000, 15001, 15006, 15020, 15021, 15090]);
        assert_eq!(parse(&[]).expect("defaults").config().expect("valid"), Config::default());
    }

    #[test]
    fn long_names_and_istio_aliases() {
        let args = parse(&[
            "--proxy-port=16001",
            "--inbound-capture-port=16006",
            "--proxy-uid=1000",
            "--proxy-gid=2000",
            "--include-outbound-cidrs=10.0.0.0/8",
            "--exclude-outbound-cidrs=10.96.0.0/12",
            "--include-inbound-ports=8080",
            "--exclude-inbound-ports=22",
            "--exclude-outbound-ports=3306",
            "--include-outbound-ports=443",
            "--ipv6=off",
            "--backend=legacy",
        ])
        .expect("long names");
        let c = args.config().expect("valid");
        assert_eq!(
            (c.proxy_port, c.inbound_capture_port, &c.proxy_uids, &c.proxy_gids),
            (16001, 16006, &vec![1000], &vec![2000])
        );
        assert_eq!(args.families(), [Family::V4]);
        let istio = parse(&["--envoy-port=16001", "--istio-service-cidr=10.0.0.0/8", "--istio-local-exclude-ports=22"])
            .expect("aliases");
        assert_eq!(istio.proxy_port, 16001);
        assert_eq!(istio.exclude_inbound_ports, Ports(vec![22]));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag, says) in [
            (&["-p", "0"][..], "--proxy-port", "0"),
            (&["-z", "70000"][..], "--inbound-capture-port", "70000"),
            (&["-d", "22,99999"][..], "--exclude-inbound-ports", "99999"),
            (&["-o", "ssh"][..], "--exclude-outbound-ports", "ssh"),
            (&["-x", "10.0.0.0/33"][..], "--exclude-outbound-cidrs", "10.0.0.0/33"),
            (&["-i", "10.0.0.1/8,banana"][..], "--include-outbound-cidrs", "banana"),
            (&["-b", "*,80"][..], "--include-inbound-ports", "stand alone"),
            (&["-u", "root"][..], "--proxy-uid", "root"),
            (&["-m", "TPROXY"][..], "--inbound-interception-mode", "TPROXY is not supported"),
            (&["-m", "NAT"][..], "--inbound-interception-mode", "NAT"),
        ] {
            let err = parse(args).expect_err("must fail");
            assert!(err.contains(flag) && err.contains(says), "{args:?}: {err}");
        }
        let err = parse(&["-p", "15006"]).expect("parses").config().expect_err("same ports").to_string();
        assert!(err.contains("-p/--proxy-port") && err.contains("-z/--inbound-capture-port"), "{err}");
    }

    #[test]
    fn the_gid_defaults_to_the_uid() {
        let c = parse(&["-u", "1000,1001"]).expect("uids").config().expect("valid");
        assert_eq!(c.proxy_gids, [1000, 1001]);
    }

    #[test]
    fn dry_run_prints_both_families_under_a_comment() {
        let text = dry_run_text(&Config::default(), &Family::ALL);
        assert!(
            text.starts_with("# serin iptables: IPv4 nat rules, for `iptables-restore --noflush`\n*nat\n"),
            "{text}"
        );
        assert!(text.contains("# serin iptables: IPv6 nat rules, for `ip6tables-restore --noflush`\n*nat\n"), "{text}");
        assert_eq!(text.matches("COMMIT\n").count(), 2);
    }
}
