//! Stamps the git revision into the binary for `lesson_replay_build_info`
//! (a `GIT_REVISION` variable wins, as in the Docker build). The name it sets,
//! `LR_GIT_REVISION`, stays out of the `LESSON_REPLAY_` settings namespace:
//! cargo also exports it to processes it runs.

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let revision = std::env::var("GIT_REVISION").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=LR_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
