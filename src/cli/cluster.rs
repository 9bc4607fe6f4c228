//! `keyhaven cluster status`: the nodes sharing this keyhaven's database, their
//! versions and heartbeats, and the leader (`keyhaven.cluster_status` over the
//! local socket).

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

use super::call::local;
use super::keypair::{print_json, s, table};
use super::rsync::ListOut;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// The backend, each node (up or down, leader or not) and this node's id.
    Status {
        #[command(flatten)]
        out: ListOut,
    },
}

/// Seconds since the epoch of a `{"$date": ms}` value.
fn secs(d: &Value) -> String {
    d["$date"].as_i64().map(|ms| format!("{}", ms / 1000)).unwrap_or_else(|| "-".into())
}

pub fn run(cmd: ClusterCmd) -> Result<ExitCode, String> {
    match cmd {
        ClusterCmd::Status { out } => {
            let st = local(out.common(), "keyhaven.cluster_status", vec![])?;
            if out.json() {
                print_json(&st);
                return Ok(ExitCode::SUCCESS);
            }
            println!("backend: {}", s(&st["backend"]));
            println!("this node: {}", s(&st["node_id"]));
            println!(
                "leader: {}",
                if st["leader"].is_null() { "none (failover under way)".into() } else { s(&st["leader"]) }
            );
            let mut rows = vec![[
                "NODE",
                "HOSTNAME",
                "VERSION",
                "ADDRESS",
                "STARTED (epoch s)",
                "HEARTBEAT (epoch s)",
                "STATE",
                "ROLE",
            ]
            .map(String::from)
            .to_vec()];
            for n in st["nodes"].as_array().into_iter().flatten() {
                let role = match (n["leader"] == true, n["this_node"] == true) {
                    (true, true) => "leader (this node)",
                    (true, false) => "leader",
                    (false, true) => "this node",
                    (false, false) => "",
                };
                rows.push(vec![
                    s(&n["id"]),
                    s(&n["hostname"]),
                    s(&n["version"]),
                    s(&n["address"]),
                    secs(&n["started_at"]),
                    secs(&n["last_heartbeat"]),
                    if n["up"] == true { "up" } else { "down" }.into(),
                    role.into(),
                ]);
            }
            table(&rows);
            Ok(ExitCode::SUCCESS)
        }
    }
}
