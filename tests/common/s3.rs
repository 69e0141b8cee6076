//! A real S3-compatible server for the tests: `s3s-fs` on a free loopback port
//! with a temporary root (scripts/test.sh installs it when missing).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region};
use lesson_replay::config::settings::Config;
use secrecy::SecretString;

pub const ACCESS_KEY: &str = "lesson-replay-test";
pub const SECRET_KEY: &str = "lesson-replay-test-secret";

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub port: u16,
    pub root: PathBuf,
}

/// The s3s-fs binary: `$S3S_FS_BIN`, else `s3s-fs` from `$CARGO_HOME/bin` or the PATH.
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("S3S_FS_BIN") {
        return path.into();
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let installed = cargo_home.join("bin/s3s-fs");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("s3s-fs")
    }
}

impl S3Server {
    /// Start a server with one bucket, `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port, bucket, tempdir())
    }

    /// Start on a given port and root.
    pub fn start_on(port: u16, bucket: &str, root: PathBuf) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let child = spawn(port, &root, SECRET_KEY);
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            root,
        }
    }

    /// Stop the server (an outage), keeping its data.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and data: the outage is over.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port, &self.root, SECRET_KEY);
    }

    /// Restart with another secret key: the worker's credentials stop working,
    /// as when a store's keys are rotated under a running fleet.
    pub fn restart_with_secret(&mut self, secret: &str) {
        self.stop();
        self.child = spawn(self.port, &self.root, secret);
    }

    /// Point `config` at this server and bucket, archiving on.
    pub fn configure(&self, config: &mut Config, bucket: &str) {
        configure_store(config, &self.endpoint, bucket);
    }

    /// The multipart uploads under way in the store: s3s-fs 0.14 has no
    /// `ListMultipartUploads`, and keeps each upload in a `.upload*` entry of
    /// its root. Tests check this sees an upload under way before they trust
    /// it to see none.
    pub fn incomplete_uploads(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }

    /// A plain S3 client for inspecting the bucket.
    pub fn client(&self) -> Client {
        client_for(&self.endpoint)
    }
}

/// Point `config` at the test store at `endpoint` (path style, the tests'
/// credentials) and `bucket`, archiving on.
pub fn configure_store(config: &mut Config, endpoint: &str, bucket: &str) {
    config.archive = true;
    config.s3_endpoint = Some(endpoint.to_owned());
    config.s3_force_path_style = true;
    config.s3_access_key_id = Some(SecretString::from(ACCESS_KEY));
    config.s3_secret_access_key = Some(SecretString::from(SECRET_KEY));
    config.s3_bucket = Some(bucket.to_owned());
}

/// A plain S3 client of the test store at `endpoint`, for inspecting it.
pub fn client_for(endpoint: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .build();
    Client::from_conf(config)
}

/// Every key of `bucket`, sorted.
pub async fn keys(client: &Client, bucket: &str) -> Vec<String> {
    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

/// The upload journal's entries in `bucket` (any prefix), sorted.
pub async fn journal_entries(client: &Client, bucket: &str) -> Vec<String> {
    keys(client, bucket)
        .await
        .into_iter()
        .filter(|k| k.contains("/.lesson-replay-uploads/"))
        .collect()
}

/// The bytes of `bucket/key`, read with `client`.
pub async fn object(client: &Client, bucket: &str, key: &str) -> Vec<u8> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {bucket}/{key}: {e}"));
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Run s3s-fs on `port` and wait until it listens.
fn spawn(port: u16, root: &std::path::Path, secret: &str) -> Child {
    let child = Command::new(binary())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", secret])
        .arg(root)
        // Its log, for debugging a test: S3S_FS_LOG=path (RUST_LOG=s3s=debug for more).
        .stdout(match std::env::var("S3S_FS_LOG") {
            Ok(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            Err(_) => Stdio::null(),
        })
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs runs (scripts/test.sh installs it: cargo install s3s-fs@0.14.1 --features binary --locked)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lesson-replay-s3-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
