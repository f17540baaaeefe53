//! `serin iptables` for real, inside throw-away network namespaces: the rules
//! land in the nat table, a second run adds nothing, `--cleanup` removes them,
//! and TCP is actually captured (outbound to 15001, inbound to 15006) except for
//! the proxy's uid, loopback and the excluded addresses and ports.
//!
//! Needs root, iproute2, iptables (nf_tables and legacy), `setpriv` and `curl`;
//! fails saying what is missing unless `SERIN_SKIP_NETNS=1` is set on purpose.

#[allow(dead_code)]
#[path = "../../tests/src/netns.rs"]
mod netns;

use std::process::{Command, Output};
use std::time::Duration;

use netns::{Netns, Process, run_bounded};
use serin::iptables::{Config, Family, generate};

const SERIN: &str = env!("CARGO_BIN_EXE_serin");
const IPTABLES_TOOLS: [&str; 6] = [
    "iptables-restore",
    "iptables-save",
    "ip6tables-restore",
    "ip6tables-save",
    "iptables-legacy-restore",
    "iptables-legacy-save",
];
const PROXY_UID: u32 = 1337;
const WAIT: Duration = Duration::from_secs(10);

/// Runs `serin iptables args` inside `ns` as root.
fn serin_iptables(ns: &Netns, args: &[&str]) -> Output {
    let mut cmd = ns.command(SERIN);
    cmd.arg("iptables").args(args).env("NO_COLOR", "1").env("RUST_LOG", "info");
    run_bounded(&mut cmd, netns::COMMAND_TIMEOUT).expect("run serin iptables")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "serin iptables failed ({}): {stderr}", out.status);
    stderr
}

/// The nat table as `save` prints it, without its timestamped comments.
fn nat(ns: &Netns, save: &str) -> Vec<String> {
    let out = ns.exec(&[save, "-t", "nat"]).expect("iptables-save");
    out.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect()
}

fn serin_lines(table: &[String]) -> Vec<&String> {
    table.iter().filter(|l| l.contains("SERIN_")).collect()
}

/// Every rule serin generates for `family` with `config` is in `table` exactly once.
fn assert_applied(table: &[String], config: &Config, family: Family) {
    for rule in generate(config, family).rules {
        let line = rule.to_string();
        let n = table.iter().filter(|l| **l == line).count();
        assert_eq!(n, 1, "{family}: `{line}` is there {n} times:\n{}", table.join("\n"));
    }
    for chain in ["SERIN_OUTPUT", "SERIN_REDIRECT", "SERIN_IN_REDIRECT", "SERIN_INBOUND"] {
        assert!(table.contains(&format!(":{chain} - [0:0]")), "{family}: chain {chain} missing:\n{}", table.join("\n"));
    }
}

#[test]
fn rules_are_applied_once_replaced_and_cleaned_up() {
    if !netns::require("rules_are_applied_once_replaced_and_cleaned_up", &IPTABLES_TOOLS) {
        return;
    }
    let ns = Netns::unique("serin-ipt").expect("netns");

    ok(&serin_iptables(&ns, &[]));
    let v4 = nat(&ns, "iptables-save");
    let v6 = nat(&ns, "ip6tables-save");
    assert_applied(&v4, &Config::default(), Family::V4);
    assert_applied(&v6, &Config::default(), Family::V6);
    assert!(v6.contains(&"-A SERIN_OUTPUT -d ::1/128 -j RETURN".to_string()), "{v6:#?}");

    // Twice: nothing changes, no duplicates.
    let stderr = ok(&serin_iptables(&ns, &[]));
    assert!(stderr.contains("IPv4: the serin rules are already in place"), "{stderr}");
    assert_eq!(nat(&ns, "iptables-save"), v4);
    assert_eq!(nat(&ns, "ip6tables-save"), v6);

    // Other flags replace the rules (still one jump each).
    ok(&serin_iptables(&ns, &["-d", "22", "-x", "10.96.0.0/12,fd00:96::/64", "-o", "3306"]));
    let config = Config {
        exclude_inbound_ports: vec![22],
        exclude_outbound_cidrs: "10.96.0.0/12,fd00:96::/64".parse::<serin::iptables::Cidrs>().expect("cidrs").0,
        exclude_outbound_ports: vec![3306],
        ..Config::default()
    };
    let v4 = nat(&ns, "iptables-save");
    assert_applied(&v4, &config, Family::V4);
    assert_applied(&nat(&ns, "ip6tables-save"), &config, Family::V6);
    assert_eq!(serin_lines(&v4).len(), 4 + generate(&config, Family::V4).rules.len(), "{v4:#?}");

    // Cleanup removes everything serin added, and is harmless when repeated.
    ok(&serin_iptables(&ns, &["--cleanup"]));
    assert_eq!(serin_lines(&nat(&ns, "iptables-save")), Vec::<&String>::new());
    assert_eq!(serin_lines(&nat(&ns, "ip6tables-save")), Vec::<&String>::new());
    let stderr = ok(&serin_iptables(&ns, &["--cleanup"]));
    assert!(stderr.contains("IPv4: no serin rules to remove"), "{stderr}");

    // --ipv6 off leaves ip6tables alone.
    ok(&serin_iptables(&ns, &["--ipv6", "off"]));
    assert_applied(&nat(&ns, "iptables-save"), &Config::default(), Family::V4);
    assert_eq!(serin_lines(&nat(&ns, "ip6tables-save")), Vec::<&String>::new());
}

#[test]
fn a_namespace_using_legacy_iptables_stays_on_legacy() {
    if !netns::require("a_namespace_using_legacy_iptables_stays_on_legacy", &IPTABLES_TOOLS) {
        return;
    }
    let ns = Netns::unique("serin-ipt").expect("netns");
    ok(&serin_iptables(&ns, &["--backend", "legacy"]));
    assert_applied(&nat(&ns, "iptables-legacy-save"), &Config::default(), Family::V4);

    // Auto finds the rules in the legacy tables (and none in nf_tables): it keeps using legacy.
    let stderr = ok(&serin_iptables(&ns, &[]));
    assert!(stderr.contains("using iptables-legacy-restore"), "{stderr}");
    assert!(stderr.contains("IPv4: the serin rules are already in place"), "{stderr}");
    assert_eq!(serin_lines(&nat(&ns, "iptables-nft-save")), Vec::<&String>::new());

    ok(&serin_iptables(&ns, &["--cleanup"]));
    assert_eq!(serin_lines(&nat(&ns, "iptables-legacy-save")), Vec::<&String>::new());
    assert_eq!(serin_lines(&nat(&ns, "ip6tables-legacy-save")), Vec::<&String>::new());
}

/// `curl` from inside `ns` (as `uid`, or root); returns the `"service"` that answered.
fn who_answers(ns: &Netns, uid: Option<u32>, url: &str) -> String {
    let mut cmd = match uid {
        Some(uid) => ns.command_as(uid, uid, "curl"),
        None => ns.command("curl"),
    };
    cmd.args(["-sS", "-g", "--noproxy", "*", "--max-time", "5", url]);
    let out = run_bounded(&mut cmd, WAIT).expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl {url} in {}: {}", ns.name(), String::from_utf8_lossy(&out.stderr));
    let service = body.split("\"service\":\"").nth(1).and_then(|s| s.split('"').next());
    service.unwrap_or_else(|| panic!("curl {url}: unexpected answer {body}")).to_string()
}

/// A demo upstream answering as `service` on `listen` inside `ns`.
fn upstream(ns: &Netns, uid: Option<u32>, listen: &str, service: &str) -> Process {
    let mut cmd = match uid {
        Some(uid) => ns.command_as(uid, uid, SERIN),
        None => ns.command(SERIN),
    };
    cmd.args(["upstream", "--listen", listen, "--service", service]).env("RUST_LOG", "warn");
    Process::spawn(cmd).expect("start serin upstream")
}

#[test]
fn tcp_is_captured_as_istio_does_and_released_by_cleanup() {
    if !netns::require(
        "tcp_is_captured_as_istio_does_and_released_by_cleanup",
        &["iptables-restore", "iptables-save", "ip6tables-restore", "curl", "ss"],
    ) {
        return;
    }
    // Two pods joined by a veth pair: `app` gets the rules, `peer` is somewhere else.
    let app = Netns::unique("serin-ipt-app").expect("netns");
    let peer = Netns::unique("serin-ipt-peer").expect("netns");
    app.veth("eth0", &peer, "eth0").expect("veth");
    for (ns, addrs) in [(&app, ["10.251.0.1/24", "fd00:251::1/64"]), (&peer, ["10.251.0.2/24", "fd00:251::2/64"])] {
        for addr in addrs {
            ns.add_addr("eth0", addr).expect("address");
        }
    }
    peer.add_addr("eth0", "10.251.0.3/24").expect("address");

    // Dual-stack listeners ([::] also takes IPv4). The capture ports run as the proxy's uid.
    let mut procs = vec![
        upstream(&peer, None, "[::]:8080", "peer"),
        upstream(&peer, None, "[::]:8082", "peer"),
        upstream(&app, None, "[::]:8080", "app"),
        upstream(&app, Some(PROXY_UID), "[::]:15001", "outbound-capture"),
        upstream(&app, Some(PROXY_UID), "[::]:15006", "inbound-capture"),
    ];
    for (ns, port) in [(&peer, 8080), (&peer, 8082), (&app, 8080), (&app, 15001), (&app, 15006)] {
        ns.wait_listening(port, WAIT).expect("listener");
    }
    for p in &mut procs {
        p.check_running().expect("listener running");
    }

    ok(&serin_iptables(&app, &["-x", "10.251.0.3/32", "-o", "8082"]));

    let root = None;
    let proxy = Some(PROXY_UID);
    // Outbound from the app: captured by 15001, IPv4 and IPv6.
    assert_eq!(who_answers(&app, root, "http://10.251.0.2:8080/"), "outbound-capture");
    assert_eq!(who_answers(&app, root, "http://[fd00:251::2]:8080/"), "outbound-capture");
    // The proxy's own traffic is not captured.
    assert_eq!(who_answers(&app, proxy, "http://10.251.0.2:8080/"), "peer");
    assert_eq!(who_answers(&app, proxy, "http://[fd00:251::2]:8080/"), "peer");
    // Excluded destination and excluded port.
    assert_eq!(who_answers(&app, root, "http://10.251.0.3:8080/"), "peer");
    assert_eq!(who_answers(&app, root, "http://10.251.0.2:8082/"), "peer");
    // Loopback: the app reaches itself directly, by localhost or by its own address…
    assert_eq!(who_answers(&app, root, "http://127.0.0.1:8080/"), "app");
    assert_eq!(who_answers(&app, root, "http://[::1]:8080/"), "app");
    assert_eq!(who_answers(&app, root, "http://10.251.0.1:8080/"), "app");
    // …while the proxy calling its own pod's address goes back in through inbound capture.
    assert_eq!(who_answers(&app, proxy, "http://10.251.0.1:8080/"), "inbound-capture");
    assert_eq!(who_answers(&app, proxy, "http://127.0.0.1:8080/"), "app");
    // Inbound to the app from another pod: captured by 15006.
    assert_eq!(who_answers(&peer, root, "http://10.251.0.1:8080/"), "inbound-capture");

    // Removing the rules restores direct traffic.
    ok(&serin_iptables(&app, &["--cleanup"]));
    assert_eq!(who_answers(&app, root, "http://10.251.0.2:8080/"), "peer");
    assert_eq!(who_answers(&app, root, "http://[fd00:251::2]:8080/"), "peer");
    assert_eq!(who_answers(&peer, root, "http://10.251.0.1:8080/"), "app");
    drop(procs);
}

#[test]
fn without_net_admin_it_fails_naming_the_rule_and_the_cause() {
    if !netns::require("without_net_admin_it_fails_naming_the_rule_and_the_cause", &IPTABLES_TOOLS) {
        return;
    }
    let ns = Netns::unique("serin-ipt").expect("netns");
    let mut cmd = ns.command_as(PROXY_UID, PROXY_UID, SERIN);
    cmd.args(["iptables"]).env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, netns::COMMAND_TIMEOUT).expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NET_ADMIN"), "{stderr}");
    assert!(stderr.contains("`-A SERIN_REDIRECT -p tcp -j REDIRECT --to-ports 15001`"), "{stderr}");
    assert!(serin_lines(&nat(&ns, "iptables-save")).is_empty());
}

#[test]
fn without_iptables_installed_it_fails_naming_the_program() {
    if !netns::require("without_iptables_installed_it_fails_naming_the_program", &[]) {
        return;
    }
    let ns = Netns::unique("serin-ipt").expect("netns");
    let mut cmd = ns.command("/usr/bin/env");
    cmd.args(["PATH=/nonexistent", SERIN, "iptables"]).env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, netns::COMMAND_TIMEOUT).expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`iptables-restore` was not found in PATH"), "{stderr}");
}

/// Flag errors need no namespace: they are refused before anything runs.
#[test]
fn bad_flags_are_refused_naming_the_flag() {
    for (args, says) in [
        (&["-x", "10.0.0.0/33"][..], "--exclude-outbound-cidrs"),
        (&["-d", "80,99999"][..], "--exclude-inbound-ports"),
        (&["-p", "http"][..], "--proxy-port"),
        (&["-m", "TPROXY"][..], "TPROXY is not supported"),
        (&["-p", "15006"][..], "-p/--proxy-port"),
    ] {
        let out = Command::new(SERIN)
            .arg("iptables")
            .args(args)
            .arg("--dry-run")
            .env("NO_COLOR", "1")
            .output()
            .expect("run serin");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed rules");
    }
}

#[test]
fn dry_run_prints_the_rules_without_touching_anything() {
    let out = Command::new(SERIN).args(["iptables", "--dry-run"]).output().expect("run serin");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let v4 = generate(&Config::default(), Family::V4).restore_input();
    let v6 = generate(&Config::default(), Family::V6).restore_input();
    assert_eq!(
        text,
        format!(
            "# serin iptables: IPv4 nat rules, for `iptables-restore --noflush`\n{v4}\
             # serin iptables: IPv6 nat rules, for `ip6tables-restore --noflush`\n{v6}"
        )
    );
}
