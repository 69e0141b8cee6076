//! The `lesson-replay` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    lesson_replay::cli::main()
}
