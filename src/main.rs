use std::process::ExitCode;

fn main() -> ExitCode {
    prefhost::cli::main()
}
