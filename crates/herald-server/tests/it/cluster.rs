//! `scripts/cluster`: Redis, two nodes and an nginx load balancer on loopback.

use std::process::Command;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Client, DEADLINE, free_port};

struct Cluster {
    dir: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn run(&self, verb: &str) -> std::process::Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/cluster");
        Command::new(script)
            .arg(verb)
            .envs(self.env.iter().cloned())
            .output()
            .expect("scripts/cluster runs")
    }

    fn port(&self, name: &str) -> u16 {
        self.env.iter().find(|(key, _)| key == name).unwrap().1.parse().unwrap()
    }

    fn secret(&self, name: &str) -> String {
        let env = std::fs::read_to_string(self.dir.join("env")).unwrap();
        let line = env.lines().find(|line| line.contains(name)).unwrap();
        line.split('=').nth(1).unwrap().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_client_behind_the_balancer_receives_what_the_other_node_publishes() {
    let dir = std::env::temp_dir().join(format!("herald-cluster-{}", std::process::id()));
    let env = vec![
        ("CLUSTER_DIR".to_owned(), dir.display().to_string()),
        ("HERALD_BIN".to_owned(), env!("CARGO_BIN_EXE_herald").to_owned()),
        ("LB_PORT".to_owned(), free_port().to_string()),
        ("NODE1_PORT".to_owned(), free_port().to_string()),
        ("NODE2_PORT".to_owned(), free_port().to_string()),
        ("REDIS_PORT".to_owned(), free_port().to_string()),
    ];
    let cluster = Cluster { dir, env };
    let started = cluster.run("start");
    assert!(
        started.status.success(),
        "{}{}",
        String::from_utf8_lossy(&started.stdout),
        String::from_utf8_lossy(&started.stderr)
    );

    let raw = herald_server::config::RawConfig::from_toml(&format!(
        "[jwt]\nsecret = \"{}\"",
        cluster.secret("HERALD_JWT_SECRET")
    ))
    .unwrap();
    let jwt = herald_server::config::Config::from_raw(raw).unwrap().jwt;
    let token = herald_server::auth::mint(&jwt, "alice", &[], 600);
    let url = format!("ws://127.0.0.1:{}/ws?token={token}", cluster.port("LB_PORT"));
    let (ws, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::connect_async(url.into_client_request().unwrap()),
    )
    .await
    .unwrap()
    .expect("upgrade through the balancer");
    let mut client = Client { ws };
    let landed_on = client.expect_type("auth_success").await["data"]["node_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Find the node the client is not on, and publish there.
    let api_key = cluster.secret("HERALD_API_KEY");
    let mut other = None;
    for name in ["NODE1_PORT", "NODE2_PORT"] {
        let base = format!("http://127.0.0.1:{}", cluster.port(name));
        let (_, stats) = herald_server::http_client::request("GET", &format!("{base}/stats"), None, None)
            .await
            .unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        if stats["node_id"] != landed_on.as_str() {
            other = Some(base);
        }
    }
    let other = other.expect("the client is on one of the two nodes");
    let body = json!({"channel": "user:alice", "data": {"from": "the other node"}}).to_string();
    let (status, reply) =
        herald_server::http_client::request("POST", &format!("{other}/api/v1/publish"), Some(&api_key), Some(body))
            .await
            .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(client.next_frame().await["data"], json!({"from": "the other node"}));

    let stopped = cluster.run("stop");
    assert!(stopped.status.success());
    let lb = std::net::TcpStream::connect(("127.0.0.1", cluster.port("LB_PORT")));
    assert!(lb.is_err(), "the balancer was stopped");
    for name in ["NODE1_PORT", "NODE2_PORT", "REDIS_PORT"] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", cluster.port(name))).is_err(),
            "{name} still open"
        );
    }
}
