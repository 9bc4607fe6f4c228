//! `keyhaven rsync …`: list rsync tasks and run one now (optionally waiting,
//! with a progress bar), over the local socket.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::call::local;
use super::keypair::{print_json, s, table};
use super::Common;

#[derive(Subcommand)]
pub enum RsyncCmd {
    /// List rsync tasks with their last run.
    List {
        #[command(flatten)]
        out: ListOut,
    },
    /// Run a task now; with --wait, show its progress and exit non-zero if it fails.
    Run {
        /// Task id
        id: i64,
        /// Wait for the run to end
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
pub struct ListOut {
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

impl ListOut {
    pub fn json(&self) -> bool {
        self.json
    }

    pub fn common(&self) -> &Common {
        &self.common
    }
}

fn remote(t: &Value) -> String {
    if t["mode"] == "MODULE" {
        return format!("{}::{}", s(&t["remotehost"]), s(&t["remotemodule"]));
    }
    let c = &t["ssh_credentials"];
    let host = if c.is_object() {
        format!("{}@{}", s(&c["attributes"]["username"]), s(&c["attributes"]["host"]))
    } else {
        format!("{}@{}", s(&t["user"]), s(&t["remotehost"]))
    };
    format!("{host}:{}", s(&t["remotepath"]))
}

fn when(d: &Value) -> String {
    d["$date"].as_i64().map(|ms| format!("{}", ms / 1000)).unwrap_or_else(|| "-".into())
}

pub fn run(cmd: RsyncCmd) -> Result<ExitCode, String> {
    match cmd {
        RsyncCmd::List { out } => {
            let tasks = local(&out.common, "rsynctask.query", vec![json!([]), json!({"order_by": ["id"]})])?;
            if out.json {
                print_json(&tasks);
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows =
                vec![["ID", "PATH", "REMOTE", "DIRECTION", "SCHEDULE", "ENABLED", "LAST RUN", "AT (epoch s)"]
                    .map(String::from)
                    .to_vec()];
            for t in tasks.as_array().into_iter().flatten() {
                let sc = &t["schedule"];
                let schedule = ["minute", "hour", "dom", "month", "dow"].map(|k| s(&sc[k])).join(" ");
                let (state, at) = match t["job"].as_object() {
                    Some(j) => (
                        s(&j["state"]),
                        when(if j["time_finished"].is_null() { &j["time_started"] } else { &j["time_finished"] }),
                    ),
                    None => ("never".into(), "-".into()),
                };
                rows.push(vec![
                    s(&t["id"]),
                    s(&t["path"]),
                    remote(t),
                    s(&t["direction"]),
                    schedule,
                    s(&t["enabled"]),
                    state,
                    at,
                ]);
            }
            table(&rows);
            Ok(ExitCode::SUCCESS)
        }
        RsyncCmd::Run { id, wait, common } => {
            let job = local(&common, "rsynctask.run", vec![json!(id)])?;
            if !wait {
                println!("started job {job}; `keyhaven call core.get_jobs '[[\"id\",\"=\",{job}]]'` shows it");
                return Ok(ExitCode::SUCCESS);
            }
            wait_for(&common, &job)
        }
    }
}

/// Poll the job until it ends, drawing its progress on stderr.
fn wait_for(common: &Common, job: &Value) -> Result<ExitCode, String> {
    let tty = std::io::stderr().is_terminal();
    let mut last_shown = -1.0;
    let start = Instant::now();
    loop {
        let j = local(common, "core.get_jobs", vec![json!([["id", "=", job]]), json!({"get": true})])?;
        let pct = j["progress"]["percent"].as_f64().unwrap_or(0.0);
        let desc = j["progress"]["description"].as_str().unwrap_or("");
        if tty {
            let filled = (pct / 100.0 * 30.0).round() as usize;
            eprint!("\r[{}{}] {pct:5.1}% {desc:<40.40}", "#".repeat(filled.min(30)), " ".repeat(30 - filled.min(30)));
            let _ = std::io::stderr().flush();
        } else if pct >= last_shown + 10.0 || (pct == 100.0 && last_shown < 100.0) {
            eprintln!("{pct:.0}% {desc}");
            last_shown = pct;
        }
        if j["state"] != "RUNNING" {
            if tty {
                eprintln!();
            }
            let secs = start.elapsed().as_secs_f64();
            return if j["state"] == "SUCCESS" {
                println!("rsync task finished in {secs:.1} s (job {job})");
                Ok(ExitCode::SUCCESS)
            } else {
                Err(format!("the run failed (job {job}): {}", s(&j["error"])))
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
