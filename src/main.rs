//! The `lesson-replay` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    tune_allocator();
    lesson_replay::cli::main()
}

/// Upload parts are buffers of several MiB. glibc raises its mmap threshold
/// each time such a buffer is freed, after which new ones come from the heap
/// and freed ones stay resident: RSS would follow the history of buffers, not
/// the live ones (measured: 126 MiB instead of 62 MiB, see BENCHMARKS.md).
/// A fixed threshold keeps every large buffer mmapped and returned on free.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists;
    // mallopt only changes the allocator's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}
