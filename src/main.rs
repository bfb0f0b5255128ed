//! The `pipe` binary: the CLI with every stage kind of the `stages` crate.

fn main() -> std::process::ExitCode {
    pipe::main_with(stages::registry())
}
