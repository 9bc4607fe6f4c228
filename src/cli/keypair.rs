//! `keyhaven keypair …`: human-friendly key-pair management over the local socket.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::call::local;
use super::Common;

#[derive(Subcommand)]
pub enum KeypairCmd {
    /// Generate a key pair and store it (Ed25519 unless --type says otherwise).
    Generate {
        name: String,
        #[arg(long = "type", value_enum, default_value = "ed25519")]
        key_type: KeyType,
        /// Size in bits (RSA 2048/3072/4096, default 3072; ECDSA 256/384/521)
        #[arg(long)]
        bits: Option<u32>,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Import a key pair from files (OpenSSH, PEM or PKCS#8; passphrase-protected keys too).
    Import {
        name: String,
        /// Private key file
        #[arg(long)]
        private_key: Option<PathBuf>,
        /// Public key file (.pub)
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// File holding the passphrase of an encrypted private key [or env KEYHAVEN_KEY_PASSPHRASE]
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        out: Out,
    },
    /// List key pairs.
    List {
        #[command(flatten)]
        out: Out,
    },
    /// Show one key pair (never its private key).
    Show {
        /// Id or name
        key: String,
        #[command(flatten)]
        out: Out,
    },
    /// Write the public key (default) or the private key to a file or stdout.
    Download {
        /// Id or name
        key: String,
        /// The private key instead of the public key (written 0600; never to a terminal)
        #[arg(long)]
        private: bool,
        /// Output file; `-` for stdout [default: <name>_id_<type>[.pub] in the current directory]
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Encrypt the private key with the passphrase in this file
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a key pair (--cascade also deletes the SSH connections that use it).
    Delete {
        /// Id or name
        key: String,
        #[arg(long)]
        cascade: bool,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeyType {
    Ed25519,
    Ecdsa,
    Rsa,
}

#[derive(Args)]
pub struct Out {
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

pub(super) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(super) fn table(rows: &[Vec<String>]) {
    let cols = rows.first().map(|r| r.len()).unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn resolve(common: &Common, key: &str) -> Result<Value, String> {
    let filter = match key.parse::<i64>() {
        Ok(id) => json!([["id", "=", id], ["type", "=", "SSH_KEY_PAIR"]]),
        Err(_) => json!([["name", "=", key], ["type", "=", "SSH_KEY_PAIR"]]),
    };
    let found = local(common, "keychaincredential.query", vec![filter])?;
    found
        .as_array()
        .and_then(|a| a.first().cloned())
        .ok_or_else(|| format!("no SSH key pair with id or name `{key}`; `keyhaven keypair list` shows them"))
}

fn summary(e: &Value, used: usize) -> Vec<String> {
    vec![
        s(&e["id"]),
        s(&e["name"]),
        s(&e["algorithm"]),
        s(&e["bits"]),
        s(&e["fingerprint"]),
        if e["attributes"]["private_key"].is_string() { "yes".into() } else { "no".into() },
        used.to_string(),
    ]
}

const HEADER: [&str; 7] = ["ID", "NAME", "TYPE", "BITS", "FINGERPRINT", "PRIVATE", "USED BY"];

fn show_one(common: &Common, e: &Value, json_out: bool) -> Result<(), String> {
    let mut e = e.clone();
    if let Some(a) = e.get_mut("attributes").and_then(Value::as_object_mut) {
        if a.get("private_key").is_some_and(Value::is_string) {
            a.insert("private_key".into(), json!("(stored; use `keyhaven keypair download --private`)"));
        }
    }
    let used = local(common, "keychaincredential.used_by", vec![e["id"].clone()])?;
    if json_out {
        e["used_by"] = used;
        print_json(&e);
    } else {
        let mut rows = vec![HEADER.iter().map(|h| h.to_string()).collect()];
        rows.push(summary(&e, used.as_array().map_or(0, Vec::len)));
        table(&rows);
        println!("\n{}", e["attributes"]["public_key"].as_str().unwrap_or("").trim_end());
        for u in used.as_array().into_iter().flatten() {
            println!("used by: {} ({})", s(&u["title"]), s(&u["unbind_method"]));
        }
    }
    Ok(())
}

/// Progress on stderr while a slow call runs.
fn with_progress<T>(label: &str, f: impl FnOnce() -> T) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    eprintln!("{label}…");
    let ticker = {
        let done = done.clone();
        let label = label.to_string();
        std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(if tty { 120 } else { 1000 }));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let t = started.elapsed().as_secs_f32();
                if tty {
                    eprint!("\r{} {label}… {t:.1}s ", frames[i % 4]);
                } else {
                    eprintln!("{label}… {t:.0}s");
                }
                i += 1;
            }
        })
    };
    let out = f();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    if tty {
        eprint!("\r\x1b[K");
    }
    eprintln!("{label}: done in {:.1}s", started.elapsed().as_secs_f32());
    out
}

fn read_secret_file(p: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| format!("cannot read {}: {e}", p.display()))
}

pub fn run(cmd: KeypairCmd) -> Result<ExitCode, String> {
    match cmd {
        KeypairCmd::Generate { name, key_type, bits, comment, out } => {
            let t = match key_type {
                KeyType::Ed25519 => "ED25519",
                KeyType::Ecdsa => "ECDSA",
                KeyType::Rsa => "RSA",
            };
            let mut opts = json!({"key_type": t});
            if let Some(b) = bits {
                opts["size"] = json!(b);
            }
            if let Some(c) = comment {
                opts["comment"] = json!(c);
            }
            let call = || local(&out.common, "keychaincredential.generate_ssh_key_pair", vec![opts.clone()]);
            let kp = if matches!(key_type, KeyType::Rsa) {
                with_progress(&format!("generating RSA-{} key", bits.unwrap_or(3072)), call)?
            } else {
                call()?
            };
            let e = local(
                &out.common,
                "keychaincredential.create",
                vec![
                    json!({"name": name, "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"], "public_key": kp["public_key"]}}),
                ],
            )?;
            show_one(&out.common, &e, out.json)?;
        }
        KeypairCmd::Import { name, private_key, public_key, passphrase_file, out } => {
            if private_key.is_none() && public_key.is_none() {
                return Err("give --private-key FILE and/or --public-key FILE".into());
            }
            let mut attrs = json!({});
            if let Some(p) = &private_key {
                attrs["private_key"] =
                    json!(std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?);
            }
            if let Some(p) = &public_key {
                attrs["public_key"] =
                    json!(std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?);
            }
            let pass = match &passphrase_file {
                Some(p) => Some(read_secret_file(p)?),
                None => std::env::var("KEYHAVEN_KEY_PASSPHRASE").ok(),
            };
            if let Some(pp) = pass {
                attrs["passphrase"] = json!(pp);
            }
            let e = local(
                &out.common,
                "keychaincredential.create",
                vec![json!({"name": name, "type": "SSH_KEY_PAIR", "attributes": attrs})],
            )?;
            show_one(&out.common, &e, out.json)?;
        }
        KeypairCmd::List { out } => {
            let all = local(&out.common, "keychaincredential.query", vec![json!([])])?;
            let all = all.as_array().cloned().unwrap_or_default();
            let pairs: Vec<&Value> = all.iter().filter(|e| e["type"] == "SSH_KEY_PAIR").collect();
            let used = |id: &Value| {
                all.iter().filter(|c| c["type"] == "SSH_CREDENTIALS" && &c["attributes"]["private_key"] == id).count()
            };
            if out.json {
                let v: Vec<Value> = pairs
                    .iter()
                    .map(|e| {
                        let mut e = (*e).clone();
                        e["attributes"]["private_key"] = json!(e["attributes"]["private_key"].is_string());
                        e["used_by_count"] = json!(used(&e["id"]));
                        e
                    })
                    .collect();
                print_json(&Value::Array(v));
            } else {
                let mut rows = vec![HEADER.iter().map(|h| h.to_string()).collect()];
                rows.extend(pairs.iter().map(|e| summary(e, used(&e["id"]))));
                table(&rows);
            }
        }
        KeypairCmd::Show { key, out } => {
            let e = resolve(&out.common, &key)?;
            show_one(&out.common, &e, out.json)?;
        }
        KeypairCmd::Download { key, private, output, passphrase_file, common } => {
            let e = resolve(&common, &key)?;
            let alg = e["algorithm"].as_str().and_then(|a| a.parse().ok()).unwrap_or_default();
            let default_name =
                keyhaven_core::keys::download_file_name(e["name"].as_str().unwrap_or("key"), alg, !private);
            let text = if private {
                // Through the audited API method, never a plain read.
                let mut opts = json!({});
                if let Some(p) = &passphrase_file {
                    opts["passphrase"] = json!(read_secret_file(p)?);
                }
                let r = local(&common, "keychaincredential.download_private_key", vec![e["id"].clone(), opts])?;
                r["private_key"].as_str().ok_or("this key pair has no private key")?.to_string()
            } else {
                e["attributes"]["public_key"].as_str().ok_or("this key pair has no public key")?.to_string()
            };
            let output = output.unwrap_or_else(|| PathBuf::from(default_name));
            if output.as_os_str() == "-" {
                if private && std::io::stdout().is_terminal() {
                    return Err("refusing to print a private key to a terminal; use -o FILE".into());
                }
                print!("{text}");
            } else {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if private { 0o600 } else { 0o644 })
                    .open(&output)
                    .map_err(|e| format!("cannot create {}: {e} (it must not exist yet)", output.display()))?;
                f.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
                eprintln!("wrote {}", output.display());
            }
        }
        KeypairCmd::Delete { key, cascade, out } => {
            let e = resolve(&out.common, &key)?;
            local(&out.common, "keychaincredential.delete", vec![e["id"].clone(), json!({"cascade": cascade})])?;
            if out.json {
                print_json(&json!({"deleted": e["id"]}));
            } else {
                println!("deleted key pair {} ({})", s(&e["name"]), s(&e["id"]));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
