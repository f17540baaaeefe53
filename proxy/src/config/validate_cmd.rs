//! `serin validate <paths...>`: like `istioctl validate`, every error of every file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::error::ConfigErrors;
use super::load::{ConfigSet, load_path};
use super::model::Resource;
use crate::snapshot::EndpointRegistry;

/// Validates each path (a file, or a folder taken as one configuration) and prints
/// every error, one per line, on stderr; exits 1 when there is any, else prints a
/// one-line summary on stdout. A path that holds ServiceEntries is also compiled,
/// which checks routes against that registry (hosts, subsets, ports).
pub fn validate_command(paths: &[PathBuf]) -> ExitCode {
    let mut stderr = std::io::stderr().lock();
    let mut stdout = std::io::stdout().lock();
    if paths.is_empty() {
        let _ = writeln!(stderr, "serin validate: no file or folder given");
        return ExitCode::FAILURE;
    }
    let mut error_count = 0usize;
    let mut resources = 0usize;
    let mut files = 0usize;
    for path in paths {
        match validate_one(path) {
            Ok((set, warnings)) => {
                files += set.origins.len();
                resources += set.resources.len();
                for w in warnings {
                    let _ = writeln!(stderr, "warning: {w}");
                }
            }
            Err(errors) => {
                error_count += errors.len();
                for e in errors.iter() {
                    let _ = writeln!(stderr, "{e}");
                }
            }
        }
    }
    if error_count > 0 {
        let _ = writeln!(stderr, "serin validate: {error_count} error(s)");
        ExitCode::FAILURE
    } else {
        let _ = writeln!(stdout, "OK: {files} file(s), {resources} resource(s) valid");
        ExitCode::SUCCESS
    }
}

/// Loads one path and, when it has a registry, compiles it.
fn validate_one(path: &Path) -> Result<(ConfigSet, Vec<String>), ConfigErrors> {
    let set = load_path(path)?;
    let mut warnings = set.warnings.clone();
    let has_registry = set.resources.iter().any(|r| matches!(r.resource, Resource::ServiceEntry(_)));
    if has_registry {
        super::compile(&set, &EndpointRegistry::default(), &format!("file:{}", path.display()))?;
    } else if set.resources.iter().any(|r| matches!(r.resource, Resource::VirtualService(_))) {
        warnings.push(format!(
            "{}: no ServiceEntry in this configuration: route destinations were not checked against a registry",
            path.display()
        ));
    }
    Ok((set, warnings))
}
