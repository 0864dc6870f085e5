//! README.md is what a new user follows: its configuration table and its
//! command lines must match what the binary accepts.

use clap::CommandFactory;
use runledger::config::Cli;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The rows of the table under "## Configuration".
fn configuration_rows(readme: &str) -> Vec<String> {
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_configuration_table_lists_every_serve_flag_with_its_variable() {
    let readme = readme();
    let rows = configuration_rows(&readme);
    let mut cli = Cli::command();
    let serve = cli.find_subcommand_mut("serve").expect("a serve command");
    let mut missing = Vec::new();
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if ["help", "version"].contains(&long) {
            continue;
        }
        let flag = format!("`--{long}`");
        let Some(row) = rows
            .iter()
            .find(|r| r.split('|').nth(1).is_some_and(|c| c.contains(&flag)))
        else {
            missing.push(flag);
            continue;
        };
        if let Some(env) = arg.get_env() {
            let env = format!("`{}`", env.to_string_lossy());
            assert!(row.contains(&env), "the row of {flag} names {env}: {row}");
        }
    }
    assert!(
        missing.is_empty(),
        "README's configuration table lacks {missing:?}"
    );
    // And the table names no flag the server does not take.
    for row in &rows {
        let flags = row.split('|').nth(1).unwrap();
        for flag in flags.split('`').filter(|f| f.starts_with("--")) {
            let long = &flag[2..];
            assert!(
                serve.get_arguments().any(|a| a.get_long() == Some(long)),
                "README lists {flag}, which `serve` does not take"
            );
        }
    }
}

#[test]
fn every_runledger_command_in_the_readme_parses() {
    let readme = readme();
    let mut checked = 0;
    for line in readme.lines() {
        let Some(rest) = line.split("cargo run --release").nth(1) else {
            continue;
        };
        // `cargo run --release [-q] -- ARGS [| ...]`
        let Some(args) = rest.split(" -- ").nth(1) else {
            continue;
        };
        let args = args
            .split(['|', ')', '&'])
            .next()
            .unwrap()
            .split_whitespace()
            .map(|a| a.trim_matches('"'));
        let argv: Vec<&str> = std::iter::once("runledger").chain(args).collect();
        if let Err(e) = Cli::try_parse_from_args(&argv) {
            panic!("README's `{}` does not parse: {e}", argv.join(" "));
        }
        checked += 1;
    }
    assert!(checked >= 6, "found only {checked} runledger commands");
}

trait TryParse {
    fn try_parse_from_args(argv: &[&str]) -> Result<Cli, clap::Error>;
}

impl TryParse for Cli {
    fn try_parse_from_args(argv: &[&str]) -> Result<Cli, clap::Error> {
        <Cli as clap::Parser>::try_parse_from(argv)
    }
}
