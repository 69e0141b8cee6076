//! A RabbitMQ cluster of three nodes on loopback, started by the test that
//! needs it and stopped when dropped: node names and ports of its own, a
//! temporary data directory and Erlang cookie, no plugins. It runs the
//! broker installed on the machine (Debian: /usr/lib/rabbitmq/bin).

use super::free_port;
use std::path::PathBuf;
use std::process::{Command, Output};

pub struct Cluster {
    dir: PathBuf,
    pub nodes: Vec<Node>,
}

pub struct Node {
    pub name: String,
    pub port: u16,
    dist_port: u16,
}

/// The broker's own scripts: `$RABBITMQ_SBIN`, else Debian's place, else the PATH.
fn script(name: &str) -> PathBuf {
    let dir = std::env::var("RABBITMQ_SBIN").unwrap_or_else(|_| "/usr/lib/rabbitmq/bin".into());
    let path = PathBuf::from(dir).join(name);
    if path.exists() {
        path
    } else {
        PathBuf::from(name)
    }
}

impl Cluster {
    /// Start three nodes and join the second and third to the first.
    pub fn start(test: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("lesson-replay-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let nodes = (1..=3)
            .map(|i| Node {
                name: format!("lr{}n{i}@localhost", std::process::id()),
                port: free_port(),
                dist_port: free_port(),
            })
            .collect();
        let cluster = Cluster { dir, nodes };
        for node in &cluster.nodes {
            cluster.start_server(node);
        }
        for node in &cluster.nodes {
            cluster.await_startup(node);
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"]);
            cluster.ctl(node, &["reset"]);
            cluster.ctl(node, &["join_cluster", &first]);
            cluster.ctl(node, &["start_app"]);
        }
        cluster
    }

    /// Wait until the node runs: `await_startup` fails at once while the
    /// node is not registered yet, so it is asked again.
    fn await_startup(&self, node: &Node) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            let out = self.try_ctl(&node.name, &["await_startup"]);
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not start: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    fn start_server(&self, node: &Node) {
        let data = self.dir.join(&node.name);
        let status = Command::new(script("rabbitmq-server"))
            .arg("-detached")
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", data.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", data.join("log"))
            .env("RABBITMQ_PID_FILE", data.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", data.join("none"))
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "{} did not start", node.name);
    }

    /// `rabbitmqctl -n NODE ARGS`, which must succeed.
    pub fn ctl(&self, node: &Node, args: &[&str]) -> String {
        let out = self.try_ctl(&node.name, args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_ctl(&self, node: &str, args: &[&str]) -> Output {
        Command::new(script("rabbitmqctl"))
            .env("HOME", &self.dir)
            .args(["-q", "-n", node])
            .args(args)
            .output()
            .expect("rabbitmqctl runs")
    }

    /// Every node's AMQP URL, comma-separated: an `amqp_url` for the cluster.
    pub fn amqp_url(&self) -> String {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        urls.join(",")
    }

    /// One node's AMQP URL.
    pub fn url(&self, node: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[node].port)
    }

    /// Stop the broker on a node (its connections close, it stays a member).
    pub fn stop(&self, node: usize) {
        self.ctl(&self.nodes[node], &["stop_app"]);
    }

    /// Start it again.
    pub fn resume(&self, node: usize) {
        self.ctl(&self.nodes[node], &["start_app"]);
        self.await_startup(&self.nodes[node]);
    }

    /// The node index of `queue`'s leader, asked of node `via`.
    pub fn leader(&self, queue: &str, via: usize) -> usize {
        let listed = self.ctl(
            &self.nodes[via],
            &["list_queues", "name", "leader", "--no-table-headers"],
        );
        let leader = listed
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("{queue} is not listed: {listed}"));
        self.index_of(&leader)
    }

    /// Every queue's type, asked of node `via`.
    pub fn queue_types(&self, via: usize) -> Vec<(String, String)> {
        self.ctl(
            &self.nodes[via],
            &["list_queues", "name", "type", "--no-table-headers"],
        )
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, t)| (n.to_owned(), t.trim().to_owned()))
        .collect()
    }

    /// The node index serving the connection named `name`, asked of `via`.
    pub fn node_of_connection(&self, name: &str, via: usize) -> Option<usize> {
        let listed = self.ctl(
            &self.nodes[via],
            &[
                "list_connections",
                "client_properties",
                "port",
                "--no-table-headers",
            ],
        );
        let wanted = format!("{{\"connection_name\",\"{name}\"}}");
        let port: u16 = listed
            .lines()
            .find(|l| l.contains(&wanted))?
            .rsplit('\t')
            .next()?
            .trim()
            .parse()
            .ok()?;
        self.nodes.iter().position(|n| n.port == port)
    }

    fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not a node of the cluster"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = self.try_ctl(&node.name, &["stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
