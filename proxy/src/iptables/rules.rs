//! The nat rules of `serin iptables`, as `iptables-restore` input: what Istio's
//! `istio-iptables` generates for REDIRECT mode, with the chains named `SERIN_*`.
//!
//! The rules are written in the canonical form `iptables-save` prints back
//! (`-s`/`-d` before `-o`, `-m tcp` before `--dport`, CIDRs masked to their
//! network), so the rules in place can be compared with the generated ones line by
//! line: that is how a second run detects that nothing needs to change.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Outbound TCP is redirected to the proxy's outbound port through this chain.
pub const CHAIN_REDIRECT: &str = "SERIN_REDIRECT";
/// Inbound TCP (and the proxy's calls to its own pod) is redirected to the inbound capture port through this chain.
pub const CHAIN_IN_REDIRECT: &str = "SERIN_IN_REDIRECT";
/// Jumped to from `nat/PREROUTING`: decides which inbound TCP is captured.
pub const CHAIN_INBOUND: &str = "SERIN_INBOUND";
/// Jumped to from `nat/OUTPUT`: decides which outbound TCP is captured.
pub const CHAIN_OUTPUT: &str = "SERIN_OUTPUT";
/// Every chain serin creates, in the order they are declared.
pub const CHAINS: [&str; 4] = [CHAIN_INBOUND, CHAIN_REDIRECT, CHAIN_IN_REDIRECT, CHAIN_OUTPUT];
/// The prefix of serin's chains: `--cleanup` removes every chain with it.
pub const CHAIN_PREFIX: &str = "SERIN_";

/// The proxy's own ports besides the two capture ports, never captured inbound:
/// admin (15000), Istio's merged metrics / agent (15020), health (15021) and
/// Prometheus metrics (15090).
pub const PROXY_SERVICE_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

/// Istio's defaults: outbound capture port.
pub const DEFAULT_PROXY_PORT: u16 = 15001;
/// Istio's defaults: inbound capture port.
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
/// Istio's defaults: the proxy's uid (and gid), whose traffic is never captured.
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// An IP family: the rules for `iptables` (IPv4) or `ip6tables` (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4, `iptables-restore`.
    V4,
    /// IPv6, `ip6tables-restore`.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The loopback address the proxy and the app use to talk to each other
    /// (`127.0.0.1/32`, `::1/128`): never captured outbound.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address of Istio's inbound passthrough (`127.0.0.6/32`,
    /// `::6/128`): traffic from it over `lo` is the proxy talking to the app and is
    /// never captured.
    pub fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address block, e.g. `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// single-address block (`/32`, `/128`). Host bits are cleared, as iptables does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `addr` with `prefix` leading bits (host bits cleared); `None`
    /// when `prefix` is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Cidr { addr, prefix })
    }

    /// The family of the block.
    pub fn family(&self) -> Family {
        if self.addr.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// Whether the block starts in the loopback range (`127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: prefix length `{p}` is not within 0-{max}")),
            },
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("`{s}` is not a valid CIDR block"))
    }
}

/// Splits a comma-separated flag value, ignoring blanks (`""` is the empty list).
fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(n) => Err(format!("port {n} is not within 1-65535")),
        Err(_) => Err(format!("`{p}` is not a port number")),
    }
}

/// A comma-separated list of TCP ports (`""` = none), e.g. `15090,15021,15020`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

impl FromStr for Ports {
    type Err = String;

    fn from_str(s: &str) -> Result<Ports, String> {
        let mut ports = Vec::new();
        for p in split_list(s) {
            let port = parse_port(p)?;
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        Ok(Ports(ports))
    }
}

/// The inbound ports to capture: `*` (all but the excluded ones), or a list
/// (`""` = none: no inbound capture).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every port except the proxy's own and the excluded ones (Istio's `-b '*'`).
    All,
    /// Only these ports (possibly none).
    List(Vec<u16>),
}

impl FromStr for InboundPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<InboundPorts, String> {
        if s.trim() == "*" {
            return Ok(InboundPorts::All);
        }
        if split_list(s).any(|p| p == "*") {
            return Err("`*` (all ports) must stand alone".into());
        }
        Ok(InboundPorts::List(s.parse::<Ports>()?.0))
    }
}

/// A comma-separated list of CIDR blocks, IPv4 and IPv6 mixed (`""` = none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<Cidr>);

impl FromStr for Cidrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidrs, String> {
        let mut cidrs = Vec::new();
        for c in split_list(s) {
            if c == "*" {
                return Err("`*` is not allowed here: list CIDR blocks".into());
            }
            let cidr: Cidr = c.parse()?;
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }
        Ok(Cidrs(cidrs))
    }
}

/// The outbound destinations to capture: `*` (everything not excluded) or a list
/// of CIDR blocks (`""` = none, only `--include-outbound-ports`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    /// Every destination (Istio's `-i '*'`).
    All,
    /// Only these blocks (possibly none).
    List(Vec<Cidr>),
}

impl FromStr for OutboundCidrs {
    type Err = String;

    fn from_str(s: &str) -> Result<OutboundCidrs, String> {
        if s.trim() == "*" {
            return Ok(OutboundCidrs::All);
        }
        if split_list(s).any(|p| p == "*") {
            return Err("`*` (all destinations) must stand alone".into());
        }
        Ok(OutboundCidrs::List(s.parse::<Cidrs>()?.0))
    }
}

/// A comma-separated list of numeric uids or gids, e.g. `1337`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids(pub Vec<u32>);

impl FromStr for Ids {
    type Err = String;

    fn from_str(s: &str) -> Result<Ids, String> {
        let mut ids = Vec::new();
        for p in split_list(s) {
            // u32::MAX is (uid_t)-1, "no id": iptables refuses it.
            let id = match p.parse::<u32>() {
                Ok(id) if id < u32::MAX => id,
                _ => return Err(format!("`{p}` is not a numeric id (0-{})", u32::MAX - 1)),
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Err("at least one id is needed".into());
        }
        Ok(Ids(ids))
    }
}

/// What to capture, validated: the flags of `serin iptables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Outbound capture port (`-p`), where the sidecar's outbound listener runs.
    pub proxy_port: u16,
    /// Inbound capture port (`-z`), where the sidecar's inbound listener runs.
    pub inbound_capture_port: u16,
    /// The proxy's uids (`-u`): their traffic is never captured.
    pub proxy_uids: Vec<u32>,
    /// The proxy's gids (`-g`): their traffic is never captured.
    pub proxy_gids: Vec<u32>,
    /// Outbound destinations to capture (`-i`).
    pub include_outbound_cidrs: OutboundCidrs,
    /// Outbound destinations never captured (`-x`).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound ports captured whatever the destination (`-q`).
    pub include_outbound_ports: Vec<u16>,
    /// Outbound ports never captured (`-o`).
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports to capture (`-b`).
    pub include_inbound_ports: InboundPorts,
    /// Inbound ports never captured (`-d`), besides the proxy's own.
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for Config {
    /// Istio's injected defaults: `-p 15001 -z 15006 -u 1337 -g 1337 -i '*' -b '*'`.
    fn default() -> Config {
        Config {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_capture_port: DEFAULT_INBOUND_CAPTURE_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            include_outbound_cidrs: OutboundCidrs::All,
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: InboundPorts::All,
            exclude_inbound_ports: Vec::new(),
        }
    }
}

impl Config {
    /// The inbound ports never captured: the proxy's own (the two capture ports,
    /// admin, agent, health, metrics) then the excluded ones, without repeats.
    pub fn inbound_ports_not_captured(&self) -> Vec<u16> {
        let own: BTreeSet<u16> =
            PROXY_SERVICE_PORTS.iter().copied().chain([self.proxy_port, self.inbound_capture_port]).collect();
        let mut ports: Vec<u16> = own.iter().copied().collect();
        ports.extend(self.exclude_inbound_ports.iter().filter(|p| !own.contains(p)));
        ports
    }

    /// Whether `-i` lists a loopback block: then, as in Istio, the app's own
    /// traffic over `lo` is not exempted and may be captured.
    fn includes_loopback(&self) -> bool {
        matches!(&self.include_outbound_cidrs, OutboundCidrs::List(l) if l.iter().any(Cidr::is_loopback))
    }
}

/// One `-A` line of the nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule is appended to.
    pub chain: &'static str,
    /// The match and target, in `iptables-save`'s canonical form.
    pub spec: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

/// The nat rules of one family: the chains to declare and the rules to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Which `iptables` this is for.
    pub family: Family,
    /// The rules, in the order they are appended.
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The `iptables-restore --noflush` input: declare (and so flush) serin's
    /// chains, then append the rules.
    pub fn restore_input(&self) -> String {
        let mut out = String::from("*nat\n");
        out.push_str(&self.chain_declarations());
        for rule in &self.rules {
            out.push_str(&format!("{rule}\n"));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// `:SERIN_… - [0:0]` for each chain; with `--noflush` a declared chain that
    /// already exists is flushed.
    pub fn chain_declarations(&self) -> String {
        CHAINS.iter().map(|c| format!(":{c} - [0:0]\n")).collect()
    }
}

/// Generates the nat rules of `family` for `config`, in Istio's order.
pub fn generate(config: &Config, family: Family) -> RuleSet {
    let mut rules = Vec::new();
    let mut add = |chain: &'static str, spec: String| rules.push(Rule { chain, spec });

    // The two redirect chains: the targets every capturing rule jumps to.
    add(CHAIN_REDIRECT, format!("-p tcp -j REDIRECT --to-ports {}", config.proxy_port));
    add(CHAIN_IN_REDIRECT, format!("-p tcp -j REDIRECT --to-ports {}", config.inbound_capture_port));

    // Inbound: PREROUTING sees TCP arriving at the pod.
    let inbound_ports = match &config.include_inbound_ports {
        InboundPorts::All => None,
        InboundPorts::List(ports) => Some(ports.as_slice()),
    };
    if inbound_ports.is_none_or(|ports| !ports.is_empty()) {
        add("PREROUTING", format!("-p tcp -j {CHAIN_INBOUND}"));
        for port in config.inbound_ports_not_captured() {
            add(CHAIN_INBOUND, format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
        match inbound_ports {
            None => add(CHAIN_INBOUND, format!("-p tcp -j {CHAIN_IN_REDIRECT}")),
            Some(ports) => {
                for port in ports {
                    add(CHAIN_INBOUND, format!("-p tcp -m tcp --dport {port} -j {CHAIN_IN_REDIRECT}"));
                }
            }
        }
    }

    // Outbound: OUTPUT sees TCP leaving processes in the pod.
    add("OUTPUT", format!("-p tcp -j {CHAIN_OUTPUT}"));
    for port in &config.exclude_outbound_ports {
        add(CHAIN_OUTPUT, format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    // The proxy talking to the app from the inbound passthrough address.
    add(CHAIN_OUTPUT, format!("-s {} -o lo -j RETURN", family.passthrough_source()));
    let loopback = family.loopback();
    let owners = config
        .proxy_uids
        .iter()
        .map(|id| ("--uid-owner", id))
        .chain(config.proxy_gids.iter().map(|id| ("--gid-owner", id)));
    for (owner, id) in owners {
        // The proxy calling its own pod's address (the app called its own
        // service and the proxy picked this pod): back in through inbound capture,
        // so inbound policy and metrics apply, as in Istio.
        add(CHAIN_OUTPUT, format!("! -d {loopback} -o lo -p tcp -m owner {owner} {id} -j {CHAIN_IN_REDIRECT}"));
        // The app calling its own pod over lo (localhost or its own address) is
        // left alone, unless -i lists a loopback block.
        if !config.includes_loopback() {
            add(CHAIN_OUTPUT, format!("-o lo -m owner ! {owner} {id} -j RETURN"));
        }
        // The proxy's own outbound traffic: never captured (no loop).
        add(CHAIN_OUTPUT, format!("-m owner {owner} {id} -j RETURN"));
    }
    add(CHAIN_OUTPUT, format!("-d {loopback} -j RETURN"));
    for cidr in config.exclude_outbound_cidrs.iter().filter(|c| c.family() == family) {
        add(CHAIN_OUTPUT, format!("-d {cidr} -j RETURN"));
    }
    for port in &config.include_outbound_ports {
        add(CHAIN_OUTPUT, format!("-p tcp -m tcp --dport {port} -j {CHAIN_REDIRECT}"));
    }
    match &config.include_outbound_cidrs {
        OutboundCidrs::All => add(CHAIN_OUTPUT, format!("-j {CHAIN_REDIRECT}")),
        OutboundCidrs::List(cidrs) => {
            for cidr in cidrs.iter().filter(|c| c.family() == family) {
                add(CHAIN_OUTPUT, format!("-d {cidr} -j {CHAIN_REDIRECT}"));
            }
        }
    }
    RuleSet { family, rules }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(config: &Config, family: Family) -> Vec<String> {
        generate(config, family).restore_input().lines().map(str::to_string).collect()
    }

    const DEFAULT_V4: &str = "\
*nat
:SERIN_INBOUND - [0:0]
:SERIN_REDIRECT - [0:0]
:SERIN_IN_REDIRECT - [0:0]
:SERIN_OUTPUT - [0:0]
-A SERIN_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A SERIN_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j SERIN_INBOUND
-A SERIN_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A SERIN_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A SERIN_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A SERIN_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A SERIN_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A SERIN_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A SERIN_INBOUND -p tcp -j SERIN_IN_REDIRECT
-A OUTPUT -p tcp -j SERIN_OUTPUT
-A SERIN_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A SERIN_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j SERIN_IN_REDIRECT
-A SERIN_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A SERIN_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SERIN_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j SERIN_IN_REDIRECT
-A SERIN_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A SERIN_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A SERIN_OUTPUT -d 127.0.0.1/32 -j RETURN
-A SERIN_OUTPUT -j SERIN_REDIRECT
COMMIT
";

    #[test]
    fn the_default_ipv4_rules() {
        assert_eq!(generate(&Config::default(), Family::V4).restore_input(), DEFAULT_V4);
    }

    #[test]
    fn the_default_ipv6_rules_use_the_ipv6_loopback() {
        let expected = DEFAULT_V4.replace("127.0.0.1/32", "::1/128").replace("127.0.0.6/32", "::6/128");
        assert_eq!(generate(&Config::default(), Family::V6).restore_input(), expected);
    }

    #[test]
    fn exclusions_come_before_the_catch_all_rules() {
        let config = Config {
            exclude_inbound_ports: "22, 15090,8081".parse::<Ports>().expect("ports").0,
            exclude_outbound_ports: "3306".parse::<Ports>().expect("ports").0,
            exclude_outbound_cidrs: "10.96.0.0/12,169.254.169.254,fd00:1::/64".parse::<Cidrs>().expect("cidrs").0,
            include_outbound_ports: "443".parse::<Ports>().expect("ports").0,
            proxy_uids: vec![1337, 1338],
            proxy_gids: vec![1337],
            ..Config::default()
        };
        let v4 = lines(&config, Family::V4);
        let inbound: Vec<&str> = v4.iter().filter(|l| l.starts_with("-A SERIN_INBOUND")).map(String::as_str).collect();
        assert_eq!(
            inbound,
            [
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A SERIN_INBOUND -p tcp -m tcp --dport 8081 -j RETURN",
                "-A SERIN_INBOUND -p tcp -j SERIN_IN_REDIRECT",
            ]
        );
        let output: Vec<&str> = v4.iter().filter(|l| l.starts_with("-A SERIN_OUTPUT")).map(String::as_str).collect();
        assert_eq!(
            output,
            [
                "-A SERIN_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN",
                "-A SERIN_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
                "-A SERIN_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j SERIN_IN_REDIRECT",
                "-A SERIN_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A SERIN_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A SERIN_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1338 -j SERIN_IN_REDIRECT",
                "-A SERIN_OUTPUT -o lo -m owner ! --uid-owner 1338 -j RETURN",
                "-A SERIN_OUTPUT -m owner --uid-owner 1338 -j RETURN",
                "-A SERIN_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j SERIN_IN_REDIRECT",
                "-A SERIN_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-A SERIN_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A SERIN_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A SERIN_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A SERIN_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A SERIN_OUTPUT -p tcp -m tcp --dport 443 -j SERIN_REDIRECT",
                "-A SERIN_OUTPUT -j SERIN_REDIRECT",
            ]
        );
        // Each family gets only its own blocks.
        let v6 = lines(&config, Family::V6);
        assert!(v6.contains(&"-A SERIN_OUTPUT -d fd00:1::/64 -j RETURN".to_string()), "{v6:#?}");
        assert!(!v6.iter().any(|l| l.contains("10.96.0.0")), "{v6:#?}");
        assert!(!v4.iter().any(|l| l.contains("fd00:1::")), "{v4:#?}");
    }

    #[test]
    fn listed_inbound_ports_and_outbound_cidrs_capture_only_those() {
        let config = Config {
            include_inbound_ports: "8080,9090".parse().expect("ports"),
            include_outbound_cidrs: "10.0.0.0/8, fd00::/8".parse().expect("cidrs"),
            ..Config::default()
        };
        let v4 = lines(&config, Family::V4);
        assert!(v4.contains(&"-A SERIN_INBOUND -p tcp -m tcp --dport 8080 -j SERIN_IN_REDIRECT".to_string()));
        assert!(v4.contains(&"-A SERIN_INBOUND -p tcp -m tcp --dport 9090 -j SERIN_IN_REDIRECT".to_string()));
        assert!(!v4.contains(&"-A SERIN_INBOUND -p tcp -j SERIN_IN_REDIRECT".to_string()));
        assert_eq!(v4.iter().rev().nth(1).map(String::as_str), Some("-A SERIN_OUTPUT -d 10.0.0.0/8 -j SERIN_REDIRECT"));
        assert!(!v4.contains(&"-A SERIN_OUTPUT -j SERIN_REDIRECT".to_string()));
        let v6 = lines(&config, Family::V6);
        assert_eq!(v6.iter().rev().nth(1).map(String::as_str), Some("-A SERIN_OUTPUT -d fd00::/8 -j SERIN_REDIRECT"));
    }

    #[test]
    fn no_inbound_ports_means_no_prerouting_jump() {
        let config = Config { include_inbound_ports: "".parse().expect("empty"), ..Config::default() };
        let v4 = lines(&config, Family::V4);
        assert!(!v4.iter().any(|l| l.contains("PREROUTING") || l.starts_with("-A SERIN_INBOUND")), "{v4:#?}");
        // The chain is still declared, so --cleanup and re-runs see the same chains.
        assert!(v4.contains(&":SERIN_INBOUND - [0:0]".to_string()));
    }

    #[test]
    fn no_outbound_cidrs_capture_only_the_listed_ports() {
        let config = Config {
            include_outbound_cidrs: "".parse().expect("empty"),
            include_outbound_ports: "80".parse::<Ports>().expect("ports").0,
            ..Config::default()
        };
        let v4 = lines(&config, Family::V4);
        let redirects: Vec<&String> = v4.iter().filter(|l| l.ends_with("-j SERIN_REDIRECT")).collect();
        assert_eq!(redirects, ["-A SERIN_OUTPUT -p tcp -m tcp --dport 80 -j SERIN_REDIRECT"]);
    }

    #[test]
    fn a_loopback_block_in_the_includes_drops_the_app_loopback_exemption() {
        let config = Config { include_outbound_cidrs: "127.1.2.3/32".parse().expect("cidr"), ..Config::default() };
        let v4 = lines(&config, Family::V4);
        assert!(!v4.iter().any(|l| l.contains("-m owner ! --")), "{v4:#?}");
        assert!(v4.contains(&"-A SERIN_OUTPUT -d 127.1.2.3/32 -j SERIN_REDIRECT".to_string()));
    }

    #[test]
    fn other_capture_ports_are_used_and_not_captured_inbound() {
        let config = Config { proxy_port: 16001, inbound_capture_port: 16006, ..Config::default() };
        let v4 = lines(&config, Family::V4);
        assert!(v4.contains(&"-A SERIN_REDIRECT -p tcp -j REDIRECT --to-ports 16001".to_string()));
        assert!(v4.contains(&"-A SERIN_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006".to_string()));
        assert!(v4.contains(&"-A SERIN_INBOUND -p tcp -m tcp --dport 16001 -j RETURN".to_string()));
        assert!(v4.contains(&"-A SERIN_INBOUND -p tcp -m tcp --dport 16006 -j RETURN".to_string()));
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        assert_eq!("10.1.2.3/8".parse::<Cidr>().expect("cidr").to_string(), "10.0.0.0/8");
        assert_eq!("10.1.2.3".parse::<Cidr>().expect("cidr").to_string(), "10.1.2.3/32");
        assert_eq!("fd00::1/64".parse::<Cidr>().expect("cidr").to_string(), "fd00::/64");
        assert_eq!("::1".parse::<Cidr>().expect("cidr").to_string(), "::1/128");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().expect("cidr").to_string(), "0.0.0.0/0");
        assert_eq!("::/0".parse::<Cidr>().expect("cidr").to_string(), "::/0");
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0/8", "nope", "10.0.0.0/x", "*"] {
            assert!(bad.parse::<Cidrs>().is_err(), "{bad} accepted");
        }
        assert_eq!("".parse::<Cidrs>(), Ok(Cidrs(vec![])));
    }

    #[test]
    fn ports_and_ids_parse() {
        assert_eq!("15090, 15021,15020,15090".parse::<Ports>(), Ok(Ports(vec![15090, 15021, 15020])));
        assert_eq!("".parse::<Ports>(), Ok(Ports(vec![])));
        for bad in ["0", "65536", "http", "80-90", "-1"] {
            assert!(bad.parse::<Ports>().is_err(), "{bad} accepted");
        }
        assert_eq!("*".parse::<InboundPorts>(), Ok(InboundPorts::All));
        assert!("*,80".parse::<InboundPorts>().is_err());
        assert!("*,10.0.0.0/8".parse::<OutboundCidrs>().is_err());
        assert_eq!("1337,0".parse::<Ids>(), Ok(Ids(vec![1337, 0])));
        for bad in ["", "istio", "4294967295", "-5"] {
            assert!(bad.parse::<Ids>().is_err(), "{bad} accepted");
        }
    }
}
