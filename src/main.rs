//! my-claw entry point: parse the command line, run the chosen mode, map errors to an exit
//! code. Everything else lives in the library (`app.rs` wires the server).

use std::process::ExitCode;

use clap::Parser;

use my_claw::app::{self, Cli};

fn main() -> ExitCode {
    // `.env` fills in variables that the environment does not set; a missing file is fine.
    let _ = dotenvy::dotenv();
    // `my-claw --bench …` is the documented spelling of the `bench` subcommand.
    let args = std::env::args_os().enumerate().map(|(i, a)| {
        if i == 1 && a == "--bench" {
            "bench".into()
        } else {
            a
        }
    });
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => match app::bad_value_line(&e) {
            // A setting that does not parse: one line naming the variable, like every other
            // configuration error (clap's own is three lines naming only the flag).
            Some(line) => {
                eprintln!("my-claw: error: {line}");
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    match app::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code =
                if e.downcast_ref::<my_claw::config::ConfigError>().is_some() { 2 } else { 1 };
            eprintln!("my-claw: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
