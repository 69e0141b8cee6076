//! Stamps the git revision into the binary for `lesson_replay_build_info`
//! (`LESSON_REPLAY_GIT_REVISION` wins, as in the Docker build).

fn main() {
    println!("cargo:rerun-if-env-changed=LESSON_REPLAY_GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let revision = std::env::var("LESSON_REPLAY_GIT_REVISION")
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        });
    println!(
        "cargo:rustc-env=LESSON_REPLAY_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
