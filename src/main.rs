use std::process::ExitCode;

fn main() -> ExitCode {
    prefhost::allocator::tune_for_training();
    prefhost::cli::main()
}
