//! A second S3-compatible server: moto's, on a free loopback port, for what
//! s3s-fs 0.14 lacks — `ListMultipartUploads` and lifecycle rules
//! (scripts/ensure-moto.sh installs it when missing).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use lesson_replay::config::settings::Config;

use crate::common::s3::{client_for, configure_store};

pub struct MotoServer {
    child: Child,
    pub endpoint: String,
}

/// `moto_server`: `$MOTO_SERVER_BIN`, else the virtualenv of ensure-moto.sh.
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("MOTO_SERVER_BIN") {
        return path.into();
    }
    let venv = std::env::var("MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/lesson-replay/moto")
        });
    venv.join("bin/moto_server")
}

impl MotoServer {
    /// Start a server holding one bucket, `bucket`.
    pub async fn start(bucket: &str) -> MotoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts (scripts/ensure-moto.sh installs it)");
        let server = MotoServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
            .client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("the bucket is created");
        server
    }

    /// Point `config` at this server and bucket, archiving on.
    pub fn configure(&self, config: &mut Config, bucket: &str) {
        configure_store(config, &self.endpoint, bucket);
    }

    pub fn client(&self) -> Client {
        client_for(&self.endpoint)
    }

    /// Start a multipart upload of `bucket`/`key` and send it one part, as a
    /// worker that died before journaling it would leave it.
    pub async fn open_upload(&self, bucket: &str, key: &str) {
        let client = self.client();
        let started = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(started.upload_id().unwrap())
            .part_number(1)
            .body(vec![7u8; 5 * 1024 * 1024].into())
            .send()
            .await
            .unwrap();
    }

    /// The keys of the multipart uploads under way in `bucket`.
    pub async fn uploads(&self, bucket: &str) -> Vec<String> {
        let listed = self
            .client()
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        listed
            .uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
