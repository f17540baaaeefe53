//! Subcommand arguments that clap builds only when their subcommand is the one
//! run (or its help shown).
//!
//! clap's derive builds the whole command tree before parsing: every role's
//! arguments, help texts and checks. A sidecar starting would run (and keep
//! resident) the code that describes the gateway, the control plane, `ctl`, the
//! demo, …; with [`Deferred`] it runs only its own (`Command::defer`).

use std::ops::Deref;

use clap::{ArgMatches, Args, Command, FromArgMatches};

/// `T`'s arguments, added to its subcommand only when clap needs them; boxed so
/// that the subcommand enum stays small.
#[derive(Debug)]
pub struct Deferred<T>(Box<T>);

impl<T> Deferred<T> {
    /// The parsed arguments.
    pub fn into_inner(self) -> T {
        *self.0
    }
}

impl<T> Deref for Deferred<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: FromArgMatches> FromArgMatches for Deferred<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(matches).map(|t| Self(Box::new(t)))
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(matches).map(|t| Self(Box::new(t)))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(matches)
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(matches)
    }
}

impl<T: Args> Args for Deferred<T> {
    fn augment_args(cmd: Command) -> Command {
        cmd.defer(|cmd| keep_about(cmd, T::augment_args))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        cmd.defer(|cmd| keep_about(cmd, T::augment_args_for_update))
    }

    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }
}

/// Runs `augment` on `cmd` keeping the subcommand's own description: the
/// arguments' doc comment must not replace it, as it does not when built eagerly.
fn keep_about(cmd: Command, augment: fn(Command) -> Command) -> Command {
    let (about, long_about) = (cmd.get_about().cloned(), cmd.get_long_about().cloned());
    let mut cmd = augment(cmd);
    if let Some(about) = about {
        cmd = cmd.about(about);
    }
    if let Some(long_about) = long_about {
        cmd = cmd.long_about(long_about);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser, Subcommand};

    use super::Deferred;

    /// The arguments' own description, not the subcommand's.
    #[derive(Debug, clap::Args)]
    struct Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:80")]
        listen: String,
    }

    #[derive(Debug, clap::Args)]
    struct Other {
        #[arg(long)]
        count: u32,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        /// Serve.
        Serve(Deferred<Serve>),
        /// Something else.
        Other(Deferred<Other>),
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[test]
    fn parses_like_the_plain_arguments() {
        let cli = Cli::try_parse_from(["t", "serve", "--listen", "127.0.0.1:9"]).expect("parses");
        let Cmd::Serve(args) = cli.cmd else { panic!("serve expected") };
        assert_eq!(args.listen, "127.0.0.1:9");
        let cli = Cli::try_parse_from(["t", "serve"]).expect("defaults apply");
        let Cmd::Serve(args) = cli.cmd else { panic!("serve expected") };
        assert_eq!(args.into_inner().listen, "127.0.0.1:80");
        let err = Cli::try_parse_from(["t", "other", "--count", "x"]).expect_err("bad value");
        assert!(err.to_string().contains("--count"), "{err}");
        assert!(Cli::try_parse_from(["t", "serve", "--nope"]).is_err(), "unknown flags are still refused");
    }

    #[test]
    fn the_built_tree_holds_every_subcommand_argument() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        cmd.build();
        let serve = cmd.find_subcommand("serve").expect("serve");
        assert!(serve.get_arguments().any(|a| a.get_id() == "listen"));
        assert_eq!(
            serve.get_about().map(ToString::to_string).as_deref(),
            Some("Serve"),
            "the subcommand's description, not its arguments'"
        );
    }
}
