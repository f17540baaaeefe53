//! `serin ca`: the mesh CA from the command line. `init` creates a root CA, `issue` writes a
//! workload key, certificate chain and roots in Istio's layout (a sidecar's `--cert-dir`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serin_certs::{Ca, DEFAULT_TRUST_DOMAIN, SpiffeId, write_workload};

/// `serin ca` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaCommand {
    /// Create a root CA (ECDSA P-256, 10 years): writes root-cert.pem and root-key.pem (mode 0600).
    Init {
        /// Directory for the CA files (created if missing; an existing CA key is never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate: writes key.pem (mode 0600), cert-chain.pem and root-cert.pem.
    Issue {
        /// Identity to certify: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        spiffe: SpiffeId,
        /// CA directory: made by `serin ca init`, or Istio's plug-in CA files
        /// (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
        #[arg(long)]
        dir: PathBuf,
        /// Output directory for the workload files (a sidecar's --cert-dir).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime, e.g. 24h, 90m, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
}

/// Runs a `serin ca` subcommand, printing what was written to stdout.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    run_to(cmd, &mut stdout.lock())
}

/// As [`run`], printing to `out`.
pub fn run_to(cmd: CaCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, trust_domain } => init(&dir, &trust_domain, out),
        CaCommand::Issue { spiffe, dir, out: out_dir, lifetime } => issue(&spiffe, &dir, &out_dir, lifetime, out),
    }
}

fn time(t: std::time::SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

fn init(dir: &Path, trust_domain: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let ca = Ca::init(dir, trust_domain).context("serin ca init")?;
    writeln!(out, "created a root CA for trust domain {trust_domain}, valid until {}", time(ca.not_after()))?;
    writeln!(out, "  {}", dir.join(serin_certs::ROOT_CERT_FILE).display())?;
    writeln!(out, "  {} (mode 0600)", dir.join(serin_certs::ROOT_KEY_FILE).display())?;
    Ok(())
}

fn issue(id: &SpiffeId, dir: &Path, out_dir: &Path, lifetime: Duration, out: &mut dyn Write) -> anyhow::Result<()> {
    if lifetime.is_zero() {
        bail!("serin ca issue: --lifetime must be longer than 0s");
    }
    let ca = Ca::load(dir).context("serin ca issue: loading the CA")?;
    if let Some(td) = ca.trust_domain().filter(|td| *td != id.trust_domain()) {
        eprintln!(
            "serin ca issue: warning: {id} is outside the CA's trust domain {td}; \
             peers of trust domain {td} will still accept it"
        );
    }
    let issued = ca.issue(id, lifetime).context("serin ca issue")?;
    let paths = write_workload(out_dir, &issued).context("serin ca issue: writing the workload files")?;
    let kind = if ca.is_intermediate() { "intermediate" } else { "root" };
    writeln!(
        out,
        "issued {id} (serial {}), valid until {}, signed by the {kind} CA in {}",
        issued.serial,
        time(issued.not_after),
        dir.display()
    )?;
    writeln!(out, "  {} (mode 0600)", paths.key.display())?;
    let intermediates = issued.chain.len().saturating_sub(1);
    writeln!(out, "  {} (leaf + {intermediates} intermediate(s))", paths.cert_chain.display())?;
    writeln!(out, "  {}", paths.root_cert.display())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;
    use serin_certs::WorkloadIdentity;

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(subcommand)]
        cmd: CaCommand,
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            let path = std::env::temp_dir().join(format!("serin-ca-cmd-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(args: &[&str]) -> Result<CaCommand, clap::Error> {
        Args::try_parse_from(std::iter::once("ca").chain(args.iter().copied())).map(|a| a.cmd)
    }

    fn run_ok(args: &[&str]) -> String {
        let mut out = Vec::new();
        run_to(parse(args).unwrap(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn init_then_issue() {
        let tmp = TempDir::new("ok");
        let ca_dir = tmp.0.join("ca");
        let out_dir = tmp.0.join("payment");
        let (ca, out) = (ca_dir.to_str().unwrap(), out_dir.to_str().unwrap());

        let printed = run_ok(&["init", "--dir", ca]);
        assert!(printed.contains("trust domain cluster.local"), "{printed}");
        assert!(printed.contains("root-key.pem (mode 0600)"), "{printed}");
        let mode = std::fs::metadata(ca_dir.join("root-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let spiffe = "spiffe://cluster.local/ns/default/sa/payment";
        let printed = run_ok(&["issue", "--spiffe", spiffe, "--dir", ca, "--out", out]);
        assert!(printed.contains(&format!("issued {spiffe}")), "{printed}");
        assert!(printed.contains("key.pem (mode 0600)"), "{printed}");
        let identity = WorkloadIdentity::load(&out_dir).unwrap();
        assert_eq!(identity.spiffe_id().to_string(), spiffe);
        let life = identity.not_after().duration_since(identity.not_before()).unwrap();
        assert_eq!(life, Duration::from_secs(24 * 3600 + 60), "default lifetime 24 h (+1 min backdate)");

        run_ok(&["issue", "--spiffe", spiffe, "--dir", ca, "--out", out, "--lifetime", "90m"]);
        let identity = WorkloadIdentity::load(&out_dir).unwrap();
        let life = identity.not_after().duration_since(identity.not_before()).unwrap();
        assert_eq!(life, Duration::from_secs(90 * 60 + 60));

        // A second init into the same directory is refused.
        let err = run_to(parse(&["init", "--dir", ca]).unwrap(), &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }

    #[test]
    fn arguments_are_checked() {
        assert!(matches!(
            parse(&["init", "--dir", "/x"]).unwrap(),
            CaCommand::Init { trust_domain, .. } if trust_domain == "cluster.local"
        ));
        let err =
            parse(&["issue", "--spiffe", "spiffe://cluster.local/payment", "--dir", "d", "--out", "o"]).unwrap_err();
        assert!(err.to_string().contains("/ns/<namespace>/sa/<service-account>"), "{err}");
        assert!(
            parse(&["issue", "--spiffe", "spiffe://a/ns/b/sa/c", "--dir", "d", "--out", "o", "--lifetime", "soon"])
                .is_err()
        );
        let cmd = parse(&["issue", "--spiffe", "spiffe://a/ns/b/sa/c", "--dir", "d", "--out", "o", "--lifetime", "0s"]);
        let err = run_to(cmd.unwrap(), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("--lifetime"), "{err}");
    }

    #[test]
    fn issue_without_a_ca_names_the_directory() {
        let tmp = TempDir::new("noca");
        let dir = tmp.0.to_str().unwrap();
        let out = tmp.0.join("out");
        let cmd = parse(&["issue", "--spiffe", "spiffe://cluster.local/ns/a/sa/b", "--dir", dir, "--out"]);
        assert!(cmd.is_err(), "--out needs a value");
        let cmd = parse(&[
            "issue",
            "--spiffe",
            "spiffe://cluster.local/ns/a/sa/b",
            "--dir",
            dir,
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let err = run_to(cmd, &mut Vec::new()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("no CA found") && text.contains(dir), "{text}");
    }
}
