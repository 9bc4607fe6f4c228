//! `scan_host_keys` against a real sshd and against things that are not SSH servers.

mod client_fixture;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use keyhaven_ssh::client::{scan_host_keys, ScanError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn scan_matches_ssh_keygen_and_ssh_keyscan() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let started = Instant::now();
    let keys = scan_host_keys("127.0.0.1", sshd.port, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("scan failed: {e}\nsshd log:\n{}", sshd.log()));
    eprintln!("scan_host_keys wall time: {:?}", started.elapsed());

    let types: Vec<&str> = keys.iter().map(|k| k.key_type.as_str()).collect();
    assert_eq!(types, ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]);
    for (key, t) in keys.iter().zip(["ed25519", "ecdsa", "rsa"]) {
        let (pt, pb) = sshd.host_key(t);
        assert_eq!(key.key_type, pt);
        assert_eq!(key.base64, pb);
        assert_eq!(key.line(), format!("{pt} {pb}"));
        assert_eq!(key.fingerprint, client_fixture::keygen_fingerprint(&sshd.host_pub(t)));
        assert!(key.fingerprint.starts_with("SHA256:"));
    }

    // Same set as ssh-keyscan, processed as in TrueNAS (drop '#' lines and the host field).
    let out = Command::new("ssh-keyscan")
        .args(["-p", &sshd.port.to_string(), "-T", "10", "127.0.0.1"])
        .output()
        .expect("run ssh-keyscan");
    let keyscan: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .collect();
    let ours: BTreeSet<String> = keys.iter().map(|k| k.line()).collect();
    assert_eq!(ours, keyscan);

    // Also by name (localhost may resolve to ::1 first, where nothing listens) and as a
    // bracketed address.
    for host in ["localhost", "[127.0.0.1]"] {
        let again =
            scan_host_keys(host, sshd.port, Duration::from_secs(10)).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(again, keys, "{host}");
    }
}

#[tokio::test]
async fn scan_finds_p384_and_p521_host_keys() {
    for (bits, name) in [(384, "ecdsa-sha2-nistp384"), (521, "ecdsa-sha2-nistp521")] {
        let Some(sshd) = client_fixture::start_with_ecdsa_bits(Some(bits)) else {
            return;
        };
        let keys = scan_host_keys("127.0.0.1", sshd.port, Duration::from_secs(10)).await.unwrap();
        let types: Vec<&str> = keys.iter().map(|k| k.key_type.as_str()).collect();
        assert_eq!(types, ["ssh-ed25519", name, "ssh-rsa"]);
        assert_eq!((keys[1].key_type.clone(), keys[1].base64.clone()), sshd.host_key("ecdsa"));
        assert_eq!(keys[1].fingerprint, client_fixture::keygen_fingerprint(&sshd.host_pub("ecdsa")));
    }
}

#[tokio::test]
async fn refused_port() {
    let port = client_fixture::free_port();
    let err = scan_host_keys("127.0.0.1", port, Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err, ScanError::Refused { host: "127.0.0.1".into(), port });
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!("Connection refused by 127.0.0.1 port {port}: is sshd running there and is the port right?")
    );
}

#[tokio::test]
async fn unresolvable_host() {
    let started = Instant::now();
    let err = scan_host_keys("invalid.invalid.invalid", 22, Duration::from_secs(3)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        ScanError::Resolve { host, detail } => {
            assert_eq!(host, "invalid.invalid.invalid");
            assert!(!detail.is_empty());
        }
        other => panic!("expected Resolve, got {other:?}"),
    }
    assert!(err.to_string().contains("invalid.invalid.invalid"), "{err}");
}

#[tokio::test]
async fn silent_listener_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // never speak, never close
        }
    });
    let started = Instant::now();
    let err = scan_host_keys("127.0.0.1", port, Duration::from_secs(1)).await.unwrap_err();
    let took = started.elapsed();
    holder.abort();
    assert_eq!(err, ScanError::Timeout);
    assert_eq!(err.to_string(), "SSH timeout");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
}

async fn http_listener(bind: &str) -> Option<(u16, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(bind).await.ok()?;
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    Some((port, task))
}

#[tokio::test]
async fn http_server_is_not_ssh() {
    let (port, task) = http_listener("127.0.0.1:0").await.unwrap();
    let err = scan_host_keys("127.0.0.1", port, Duration::from_secs(3)).await.unwrap_err();
    task.abort();
    match &err {
        ScanError::NotSsh { detail } => {
            assert!(detail.contains("HTTP/1.1 400 Bad Request"), "{detail}");
            assert!(detail.contains(&format!("127.0.0.1 port {port}")), "{detail}");
        }
        other => panic!("expected NotSsh, got {other:?}"),
    }
    assert!(err.to_string().starts_with("Not an SSH server: "), "{err}");
}

#[tokio::test]
async fn ipv6_literals() {
    // With and without brackets; skipped when the machine has no IPv6 loopback.
    let Some((port, task)) = http_listener("[::1]:0").await else {
        eprintln!("NOTE: no IPv6 loopback; skipping");
        return;
    };
    for host in ["::1", "[::1]"] {
        let err = scan_host_keys(host, port, Duration::from_secs(3)).await.unwrap_err();
        match &err {
            ScanError::NotSsh { detail } => assert!(detail.contains("::1 port"), "{detail}"),
            other => panic!("{host}: expected NotSsh, got {other:?}"),
        }
    }
    task.abort();

    let port = std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let err = scan_host_keys("[::1]", port, Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err, ScanError::Refused { host: "::1".into(), port });
}
