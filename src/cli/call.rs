//! `keyhaven call METHOD [JSON-PARAM ...]`: through the local unix socket (full
//! admin, no password) or, with `--url`, a remote keyhaven/TrueNAS and an API key.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::{resolve_config, Common};
use keyhaven_server::remote::{parse_cert_fingerprint, ClientError, Dialect, RpcClient, TlsTrust};

#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    common: Common,
    /// Base URL of a remote system (http:// or https://) instead of the local socket
    #[arg(long)]
    url: Option<String>,
    /// API key for --url (`<id>-<secret>`)
    #[arg(long, env = "KEYHAVEN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Username that owns the API key (for --url)
    #[arg(long, default_value = "admin")]
    username: String,
    /// Do not verify the remote's TLS certificate (self-signed remotes)
    #[arg(long)]
    insecure: bool,
    /// Trust exactly the remote certificate with this SHA-256 fingerprint
    /// (`openssl x509 -noout -fingerprint -sha256` format; safer than --insecure)
    #[arg(long, value_name = "FINGERPRINT", conflicts_with = "insecure")]
    tls_fingerprint: Option<String>,
    /// Print compact JSON instead of pretty JSON
    #[arg(long)]
    compact: bool,
    /// Method name, e.g. keychaincredential.query
    method: String,
    /// Positional parameters, each one JSON value (a bare word is taken as a string)
    params: Vec<String>,
}

fn parse_params(raw: &[String]) -> Vec<Value> {
    raw.iter().map(|p| serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.clone()))).collect()
}

fn describe_error(e: &Value) -> String {
    let data = e.get("data");
    if let Some(extra) = data.and_then(|d| d.get("extra")).and_then(Value::as_array).filter(|a| !a.is_empty()) {
        return extra
            .iter()
            .map(|x| format!("{}: {}", x[0].as_str().unwrap_or(""), x[1].as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join("; ");
    }
    data.and_then(|d| d.get("reason"))
        .and_then(Value::as_str)
        .or_else(|| e.get("message").and_then(Value::as_str))
        .unwrap_or("unknown error")
        .to_string()
}

fn print(v: &Value, compact: bool) {
    if compact {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

pub fn run(a: CallArgs) -> Result<ExitCode, String> {
    let params = parse_params(&a.params);
    let result = match &a.url {
        None => call_local(&a, params)?,
        Some(url) => call_remote(&a, url, params)?,
    };
    print(&result, a.compact);
    Ok(ExitCode::SUCCESS)
}

fn call_local(a: &CallArgs, params: Vec<Value>) -> Result<Value, String> {
    local(&a.common, &a.method, params)
}

/// One call through the local unix socket (full admin).
pub fn local(common: &Common, method: &str, params: Vec<Value>) -> Result<Value, String> {
    let cfg = resolve_config(common)?;
    let path = keyhaven_server::transport::unix::socket_path(&cfg.data_dir);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the local keyhaven at {} ({e}); is `keyhaven serve` running with this --data-dir? \
             Use --url and --api-key for a remote system",
            path.display()
        )
    })?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(format!("{req}\n").as_bytes()).map_err(|e| format!("sending the request failed: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| format!("reading the reply failed: {e}"))?;
    let reply: Value = serde_json::from_str(&line).map_err(|e| format!("the daemon sent an unreadable reply: {e}"))?;
    if let Some(e) = reply.get("error") {
        return Err(describe_error(e));
    }
    Ok(reply.get("result").cloned().unwrap_or(Value::Null))
}

fn call_remote(a: &CallArgs, url: &str, params: Vec<Value>) -> Result<Value, String> {
    let key = a.api_key.clone().ok_or("--url needs an API key: pass --api-key or set KEYHAVEN_API_KEY (create one with `keyhaven call api_key.create '{\"name\": \"cli\", \"username\": \"admin\"}'`)")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        if a.tls_fingerprint.is_some() && !url.trim().starts_with("https://") {
            return Err(format!(
                "--tls-fingerprint needs an https:// URL ({url} has no certificate to pin, and would carry the API key in clear text)"
            ));
        }
        let trust = match (&a.tls_fingerprint, a.insecure) {
            (Some(f), _) => TlsTrust::Pinned(parse_cert_fingerprint(f).ok_or_else(|| {
                format!("--tls-fingerprint {f}: give 64 hexadecimal digits (colons allowed), as openssl prints them")
            })?),
            (None, true) => TlsTrust::Insecure,
            (None, false) => TlsTrust::WebPki,
        };
        let mut c = RpcClient::connect_with(url, Dialect::JsonRpc, &trust, Duration::from_secs(30)).await.map_err(
            |e| match e {
                ClientError::CertificateVerification(m) => format!(
                    "{m}; if that is the remote's certificate, pass --tls-fingerprint with its fingerprint \
                     (or --insecure to skip verification)"
                ),
                other => format!("cannot connect to {url}: {other}"),
            },
        )?;
        let login = c
            .call("auth.login_ex", vec![json!({"mechanism": "API_KEY_PLAIN", "username": a.username, "api_key": key})])
            .await
            .map_err(|e| format!("login failed: {e}"))?;
        if login.get("response_type") != Some(&json!("SUCCESS")) {
            return Err(format!(
                "the API key was refused ({}); check --api-key and --username",
                login.get("response_type").and_then(Value::as_str).unwrap_or("?")
            ));
        }
        let out = c.call(&a.method, params).await.map_err(|e| match e {
            ClientError::Remote { extra, reason, .. } => {
                describe_error(&json!({"data": {"extra": extra, "reason": reason}}))
            }
            other => other.to_string(),
        });
        c.close().await;
        out
    })
}
