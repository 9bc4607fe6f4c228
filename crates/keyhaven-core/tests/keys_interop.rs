//! Cross-checks of `keyhaven_core::keys` against the real `ssh-keygen` and `openssl`
//! binaries: generated keys must be readable by OpenSSH with the same fingerprint,
//! and keys made by OpenSSH/OpenSSL in every format must import.
//!
//! Tests that need `openssl` print a note and pass when the binary is missing;
//! `ssh-keygen` is required.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use keyhaven_core::keys::{
    encrypt_private_key, generate, parse_host_key_lines, public_key_info, validate_key_pair, GenerateOptions,
    KeyAlgorithm, KeyPairField,
};

const PASS: &str = "correct horse 5";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn write_secret(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `ssh-keygen -l -f path` → (bits, fingerprint).
fn keygen_fingerprint(path: &Path) -> (u32, String) {
    let out = run(Command::new("ssh-keygen").arg("-l").arg("-f").arg(path));
    let mut it = out.split_whitespace();
    let bits = it.next().unwrap().parse().unwrap();
    let fp = it.next().unwrap().to_string();
    assert!(fp.starts_with("SHA256:"), "{out}");
    (bits, fp)
}

/// `ssh-keygen -y [-P pass] -f path` → "type base64".
fn keygen_public(path: &Path, pass: Option<&str>) -> String {
    let mut cmd = Command::new("ssh-keygen");
    cmd.arg("-y");
    if let Some(p) = pass {
        cmd.arg("-P").arg(p);
    }
    cmd.arg("-f").arg(path);
    type_and_blob(&run(&mut cmd))
}

fn type_and_blob(line: &str) -> String {
    let mut it = line.split_whitespace();
    format!("{} {}", it.next().unwrap(), it.next().unwrap())
}

/// `ssh-keygen -q -t .. -f dir/name [-b bits] [-m fmt] -N pass -C comment`.
fn ssh_keygen(dir: &Path, name: &str, t: &str, bits: Option<u32>, fmt: Option<&str>, pass: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", t, "-C", "imported comment", "-N", pass.unwrap_or("")]);
    if let Some(b) = bits {
        cmd.arg("-b").arg(b.to_string());
    }
    if let Some(m) = fmt {
        cmd.arg("-m").arg(m);
    }
    cmd.arg("-f").arg(&path);
    run(&mut cmd);
    path
}

fn have_openssl() -> bool {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            println!("NOTE: the openssl binary is missing; skipping the OpenSSL-made key checks");
            false
        }
    }
}

/// Error messages must not echo key material or the passphrase.
fn assert_no_leak(msg: &str, key_text: &str, pass: Option<&str>) {
    if let Some(p) = pass {
        assert!(!msg.contains(p), "message leaks the passphrase: {msg}");
    }
    for line in key_text.lines() {
        let l = line.trim();
        if l.starts_with("-----") || l.contains(':') {
            continue;
        }
        let chars: Vec<char> = l.chars().collect();
        for w in chars.windows(12).step_by(4) {
            let frag: String = w.iter().collect();
            assert!(!msg.contains(&frag), "message leaks key material ({frag}): {msg}");
        }
    }
}

/// Import `path` (optionally with `pass`) and check it against ssh-keygen.
fn check_import(path: &Path, pass: Option<&str>, expect_comment: Option<&str>) {
    let text = fs::read_to_string(path).unwrap();
    let (bits, fp) = keygen_fingerprint(path);
    let expected_pub = keygen_public(path, pass.or(Some("")));
    let v = validate_key_pair(Some(&text), None, pass).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(v.info.fingerprint, fp, "{}", path.display());
    assert_eq!(v.info.bits, bits, "{}", path.display());
    assert_eq!(type_and_blob(&v.public_key), expected_pub);
    assert!(v.public_key.ends_with('\n') && v.public_key.lines().count() == 1);
    if let Some(c) = expect_comment {
        assert_eq!(v.info.comment, c, "{}", path.display());
        assert!(v.public_key.ends_with(&format!(" {c}\n")));
    }
    // The normalised private key is unencrypted OpenSSH that ssh-keygen reads.
    let private = v.private_key.as_ref().unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
    assert!(private.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
    let dir = tempfile::tempdir().unwrap();
    let norm = dir.path().join("normalised");
    write_secret(&norm, private);
    assert_eq!(keygen_public(&norm, Some("")), expected_pub, "{}", path.display());

    // With the matching public key (another comment) too.
    let pub_line = format!("{expected_pub} other comment");
    let v2 = validate_key_pair(Some(&text), Some(&pub_line), pass).unwrap();
    assert_eq!(v2.public_key, format!("{pub_line}\n"));
    assert_eq!(v2.info.comment, "other comment");
    assert_eq!(v2.info.fingerprint, fp);

    if let Some(p) = pass {
        // Encrypted: no passphrase and a wrong passphrase are refused.
        let e = validate_key_pair(Some(&text), None, None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey, "{}", path.display());
        assert!(e.message.contains("Encrypted private keys are not allowed"), "{}: {}", path.display(), e.message);
        let e = validate_key_pair(Some(&text), None, Some("wrong passphrase")).unwrap_err();
        assert_eq!(e.field, KeyPairField::Passphrase, "{}: {}", path.display(), e.message);
        assert_eq!(e.message, "The passphrase does not decrypt this private key");
        assert_no_leak(&e.message, &text, Some(p));
    } else {
        // A passphrase given for an unencrypted key is ignored.
        let v3 = validate_key_pair(Some(&text), None, Some("not needed")).unwrap();
        assert_eq!(v3.info.fingerprint, fp, "{}", path.display());
    }
}

// ---------------------------------------------------------------------------
// generation
// ---------------------------------------------------------------------------

fn check_generated(alg: KeyAlgorithm, bits: Option<u32>, expect_bits: u32, comment: Option<&str>) {
    let o = GenerateOptions { algorithm: alg, bits, comment: comment.map(str::to_string) };
    let kp = generate(&o).unwrap();
    assert!(kp.private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
    assert!(kp.private_key.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
    assert!(kp.public_key.ends_with('\n') && !kp.public_key.ends_with(" \n"));
    assert_eq!(kp.public_key.lines().count(), 1);
    match comment {
        Some(c) => assert!(kp.public_key.ends_with(&format!(" {c}\n"))),
        None => assert_eq!(kp.public_key.split_whitespace().count(), 2),
    }

    let dir = tempfile::tempdir().unwrap();
    let stem = keyhaven_core::keys::file_stem(alg);
    let priv_path = dir.path().join(stem);
    let pub_path = dir.path().join(format!("{stem}.pub"));
    write_secret(&priv_path, &kp.private_key);
    fs::write(&pub_path, &kp.public_key).unwrap();

    let (kbits, kfp) = keygen_fingerprint(&pub_path);
    let (pbits, pfp) = keygen_fingerprint(&priv_path);
    assert_eq!((kbits, &kfp), (pbits, &pfp));
    assert_eq!(kbits, expect_bits);
    assert_eq!(keygen_public(&priv_path, Some("")), type_and_blob(&kp.public_key));

    let info = public_key_info(&kp.public_key).unwrap();
    assert_eq!(info.fingerprint, kfp);
    assert_eq!(info.bits, expect_bits);
    assert_eq!(info.algorithm, alg);
    assert_eq!(info.comment, comment.unwrap_or(""));

    // Round trip through import keeps the key, the comment and the fingerprint.
    let v = validate_key_pair(Some(&kp.private_key), None, None).unwrap();
    assert_eq!(v.public_key, kp.public_key);
    assert_eq!(v.info, info);
    let v = validate_key_pair(Some(&kp.private_key), Some(&kp.public_key), None).unwrap();
    assert_eq!(v.public_key, kp.public_key);

    // Passphrase-protected download, readable by ssh-keygen.
    let enc = encrypt_private_key(&kp.private_key, PASS).unwrap();
    assert!(enc.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n") && enc.ends_with("-----\n"));
    let enc_path = dir.path().join("encrypted");
    write_secret(&enc_path, &enc);
    assert_eq!(keygen_public(&enc_path, Some(PASS)), type_and_blob(&kp.public_key));
    let bad = Command::new("ssh-keygen").args(["-y", "-P", "wrong"]).arg("-f").arg(&enc_path).output().unwrap();
    assert!(!bad.status.success(), "ssh-keygen accepted a wrong passphrase");
    // ... and importable again with the passphrase.
    let back = validate_key_pair(Some(&enc), None, Some(PASS)).unwrap();
    assert_eq!(back.info.fingerprint, kfp);
    assert_eq!(back.public_key, kp.public_key);
    let back_path = dir.path().join("back");
    write_secret(&back_path, back.private_key.as_ref().unwrap());
    assert_eq!(keygen_public(&back_path, Some("")), type_and_blob(&kp.public_key));
}

#[test]
fn keys_generated_ed25519_and_ecdsa_pass_ssh_keygen() {
    check_generated(KeyAlgorithm::Ed25519, None, 256, None);
    check_generated(KeyAlgorithm::Ed25519, Some(256), 256, Some("backup@nas-1"));
    check_generated(KeyAlgorithm::Ecdsa, None, 256, Some("ecdsa default"));
    check_generated(KeyAlgorithm::Ecdsa, Some(384), 384, None);
    check_generated(KeyAlgorithm::Ecdsa, Some(521), 521, Some("p521 ünïcødé"));
}

#[test]
fn keys_generated_rsa_2048_3072_pass_ssh_keygen() {
    check_generated(KeyAlgorithm::Rsa, Some(2048), 2048, Some("rsa-2048"));
    check_generated(KeyAlgorithm::Rsa, None, 3072, None);
}

#[test]
fn keys_generated_rsa_4096_passes_ssh_keygen() {
    check_generated(KeyAlgorithm::Rsa, Some(4096), 4096, Some("rsa-4096"));
}

// ---------------------------------------------------------------------------
// import of ssh-keygen keys
// ---------------------------------------------------------------------------

fn import_all_formats(t: &str, bits: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    // ssh-keygen writes Ed25519 in OpenSSH format whatever -m says.
    let formats: &[Option<&str>] = if t == "ed25519" { &[None] } else { &[None, Some("PEM"), Some("PKCS8")] };
    for fmt in formats {
        for pass in [None, Some(PASS)] {
            let name = format!("{t}-{}-{}", fmt.unwrap_or("openssh"), pass.is_some());
            let path = ssh_keygen(dir.path(), &name, t, bits, *fmt, pass);
            // Only the OpenSSH format carries the comment inside the private key.
            let comment = if fmt.is_none() { Some("imported comment") } else { None };
            check_import(&path, pass, comment);
        }
    }
}

#[test]
fn keys_import_ssh_keygen_ed25519() {
    import_all_formats("ed25519", None);
}

#[test]
fn keys_import_ssh_keygen_ecdsa() {
    for bits in [256, 384, 521] {
        import_all_formats("ecdsa", Some(bits));
    }
}

#[test]
fn keys_import_ssh_keygen_rsa() {
    import_all_formats("rsa", Some(2048));
}

#[test]
fn keys_import_public_only_and_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let a = ssh_keygen(dir.path(), "a", "ed25519", None, None, None);
    let b = ssh_keygen(dir.path(), "b", "ecdsa", Some(256), None, None);
    let a_priv = fs::read_to_string(&a).unwrap();
    let a_pub = fs::read_to_string(a.with_extension("pub")).unwrap();
    let b_pub = fs::read_to_string(b.with_extension("pub")).unwrap();

    // Public only: stored as given, fingerprint as ssh-keygen.
    let v = validate_key_pair(None, Some(&b_pub), None).unwrap();
    assert!(v.private_key.is_none());
    assert_eq!(v.public_key, b_pub);
    assert_eq!(v.info.fingerprint, keygen_fingerprint(&b.with_extension("pub")).1);
    assert_eq!(v.info.key_type, "ecdsa-sha2-nistp256");
    assert_eq!(v.info.comment, "imported comment");

    // Mismatch.
    let e = validate_key_pair(Some(&a_priv), Some(&b_pub), None).unwrap_err();
    assert_eq!(e.field, KeyPairField::PublicKey);
    assert_eq!(e.message, "Private key and public key do not match");
    assert_no_leak(&e.message, &a_priv, None);

    // Pasted the wrong way round.
    let e = validate_key_pair(Some(&a_pub), None, None).unwrap_err();
    assert_eq!(e.field, KeyPairField::PrivateKey);
    assert!(e.message.contains("public key") && e.message.contains("public_key"), "{}", e.message);
    let e = validate_key_pair(None, Some(&a_priv), None).unwrap_err();
    assert_eq!(e.field, KeyPairField::PublicKey);
    assert!(e.message.contains("private key") && e.message.contains(".pub"), "{}", e.message);
    assert_no_leak(&e.message, &a_priv, None);
    let e = validate_key_pair(Some(&a_priv), Some(&a_priv), None).unwrap_err();
    assert_eq!(e.field, KeyPairField::PublicKey);
}

#[test]
fn keys_rsa_1024_and_dsa_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = ssh_keygen(dir.path(), "rsa1024", "rsa", Some(1024), None, None);
    let text = fs::read_to_string(&rsa).unwrap();
    let want = "RSA keys must be at least 2048 bits; this key has 1024 bits. Generate a new key \
                (Ed25519 is recommended).";
    let e = validate_key_pair(Some(&text), None, None).unwrap_err();
    assert_eq!((e.field, e.message.as_str()), (KeyPairField::PrivateKey, want));
    let pem = ssh_keygen(dir.path(), "rsa1024pem", "rsa", Some(1024), Some("PEM"), Some(PASS));
    let e = validate_key_pair(Some(&fs::read_to_string(&pem).unwrap()), None, Some(PASS)).unwrap_err();
    assert_eq!((e.field, e.message.as_str()), (KeyPairField::PrivateKey, want));
    let public = fs::read_to_string(rsa.with_extension("pub")).unwrap();
    let e = validate_key_pair(None, Some(&public), None).unwrap_err();
    assert_eq!((e.field, e.message.as_str()), (KeyPairField::PublicKey, want));
    // public_key_info still describes it.
    assert_eq!(public_key_info(&public).unwrap().bits, 1024);

    // DSA (ssh-keygen may have been built without it).
    let dsa = dir.path().join("dsa");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "dsa", "-N", "", "-f"])
        .arg(&dsa)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if made {
        let text = fs::read_to_string(&dsa).unwrap();
        let e = validate_key_pair(Some(&text), None, None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert!(e.message.contains("DSA keys are not supported"), "{}", e.message);
        let public = fs::read_to_string(dsa.with_extension("pub")).unwrap();
        let e = validate_key_pair(None, Some(&public), None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PublicKey);
        assert!(e.message.contains("DSA keys are not supported"), "{}", e.message);
        // DSA in PEM.
        let pem = dir.path().join("dsa_pem");
        run(Command::new("ssh-keygen").args(["-q", "-t", "dsa", "-m", "PEM", "-N", "", "-f"]).arg(&pem));
        let e = validate_key_pair(Some(&fs::read_to_string(&pem).unwrap()), None, None).unwrap_err();
        assert!(e.message.contains("DSA keys are not supported"), "{}", e.message);
    } else {
        println!("NOTE: ssh-keygen cannot make DSA keys here; DSA checks skipped");
    }
}

#[test]
fn keys_truncated_and_damaged_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (name, t, bits, fmt, pass) in [
        ("ed", "ed25519", None, None, None),
        ("ed_enc", "ed25519", None, None, Some(PASS)),
        ("rsa_pem", "rsa", Some(2048), Some("PEM"), None),
        ("rsa_pem_enc", "rsa", Some(2048), Some("PEM"), Some(PASS)),
        ("ec_pkcs8", "ecdsa", Some(256), Some("PKCS8"), None),
        ("ec_pkcs8_enc", "ecdsa", Some(384), Some("PKCS8"), Some(PASS)),
    ] {
        let path = ssh_keygen(dir.path(), name, t, bits, fmt, pass);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let n = lines.len();
        let variants = [
            // END line missing.
            lines[..n - 1].join("\n"),
            // Cut in the middle of the body, END line kept.
            format!("{}\n{}\n", lines[..n / 2].join("\n"), lines[n - 1]),
            // Cut in the middle, no END.
            lines[..n / 2].join("\n"),
            // Half a line of base64 missing.
            text.replacen(lines[n / 2], &lines[n / 2][..lines[n / 2].len() / 2], 1),
            // A character flipped in the body.
            text.replacen(lines[n / 2], &lines[n / 2].replace(|c: char| c.is_ascii_alphabetic(), "A"), 1),
            // Only the first half of the text.
            text[..text.len() / 2].to_string(),
        ];
        for (i, bad) in variants.iter().enumerate() {
            match validate_key_pair(Some(bad), None, pass) {
                Ok(v) => {
                    // A flipped character inside unencrypted key material may still parse
                    // for some formats; it must then at least be a different valid key.
                    assert_eq!(i, 4, "{name} variant {i} was accepted");
                    assert!(v.private_key.is_some());
                }
                Err(e) => {
                    assert!(
                        matches!(e.field, KeyPairField::PrivateKey | KeyPairField::Passphrase),
                        "{name} variant {i}: {e}"
                    );
                    assert_no_leak(&e.message, &text, pass);
                }
            }
        }
    }
}

#[test]
fn keys_host_key_lines_from_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("# scanned\n\n");
    let mut expected = Vec::new();
    for (i, (t, bits)) in [("ed25519", None), ("ecdsa", Some(384)), ("rsa", Some(2048))].iter().enumerate() {
        let path = ssh_keygen(dir.path(), &format!("host{i}"), t, *bits, None, None);
        let pub_path = path.with_extension("pub");
        let line = fs::read_to_string(&pub_path).unwrap();
        match i {
            0 => text.push_str(&line),
            1 => text.push_str(&format!("[127.0.0.1]:2222 {line}")),
            _ => text.push_str(&format!("any-host {}\n", type_and_blob(&line))),
        }
        expected.push((type_and_blob(&line), keygen_fingerprint(&pub_path).1));
    }
    let parsed = parse_host_key_lines(&text).unwrap();
    assert_eq!(parsed.len(), 3);
    for (p, (line, fp)) in parsed.iter().zip(&expected) {
        assert_eq!(&p.to_line(), line);
        assert_eq!(&p.fingerprint, fp);
    }
}

// ---------------------------------------------------------------------------
// OpenSSL-made keys (legacy encrypted PEM, PKCS#8 variants)
// ---------------------------------------------------------------------------

fn openssl(args: &[&str]) {
    run(Command::new("openssl").args(args));
}

/// "ssh-ed25519 base64" from `openssl pkey -pubout -outform DER` (the raw key is the
/// last 32 bytes of the SubjectPublicKeyInfo).
fn ed25519_public_from_openssl(private_path: &str) -> String {
    use base64::Engine as _;
    let out =
        Command::new("openssl").args(["pkey", "-in", private_path, "-pubout", "-outform", "DER"]).output().unwrap();
    assert!(out.status.success());
    let spki = out.stdout;
    assert_eq!(spki.len(), 44);
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&spki[12..]);
    format!("ssh-ed25519 {}", base64::engine::general_purpose::STANDARD.encode(blob))
}

#[test]
fn keys_import_openssl_legacy_and_pkcs8() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let keys = [
        ("rsa", vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("p256", vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        ("p384", vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
        ("p521", vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"]),
        ("ed25519", vec!["-algorithm", "ED25519"]),
    ];
    for (name, gen) in &keys {
        let plain = d(&format!("{name}.pk8"));
        let mut args = vec!["genpkey"];
        args.extend(gen.iter().copied());
        args.extend(["-out", plain.as_str()]);
        openssl(&args);
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o600)).unwrap();
        // Reference public key and fingerprint: ssh-keygen on the plain PKCS#8 key
        // (OpenSSH 9.2 cannot read PKCS#8 Ed25519, so build that one from openssl's SPKI).
        let expected_pub = if *name == "ed25519" {
            ed25519_public_from_openssl(&plain)
        } else {
            keygen_public(Path::new(&plain), Some(""))
        };
        let pub_path = d(&format!("{name}.pub"));
        fs::write(&pub_path, format!("{expected_pub}\n")).unwrap();
        let (_, fp) = keygen_fingerprint(Path::new(&pub_path));

        let mut variants: Vec<(String, Option<&str>)> = vec![(plain.clone(), None)];
        // Encrypted PKCS#8: PBKDF2 + AES-256-CBC (default), AES-128-CBC, scrypt.
        for (tag, extra) in [
            ("pk8-aes256", vec!["-v2", "aes-256-cbc"]),
            ("pk8-aes128", vec!["-v2", "aes-128-cbc"]),
            ("pk8-scrypt", vec!["-scrypt"]),
        ] {
            let out = d(&format!("{name}.{tag}"));
            let mut a =
                vec!["pkcs8", "-topk8", "-in", plain.as_str(), "-out", out.as_str(), "-passout", "pass:secret1"];
            a.extend(extra);
            openssl(&a);
            variants.push((out, Some("secret1")));
        }
        if *name != "ed25519" {
            // Traditional (PKCS#1 / SEC1) PEM, plain and legacy-encrypted.
            let trad = d(&format!("{name}.trad"));
            openssl(&["pkey", "-in", plain.as_str(), "-traditional", "-out", trad.as_str()]);
            variants.push((trad, None));
            for cipher in ["-aes256", "-aes192", "-aes128", "-des3"] {
                let out = d(&format!("{name}.trad{cipher}"));
                openssl(&[
                    "pkey",
                    "-in",
                    plain.as_str(),
                    "-traditional",
                    cipher,
                    "-passout",
                    "pass:x",
                    "-out",
                    out.as_str(),
                ]);
                let head = fs::read_to_string(&out).unwrap();
                assert!(head.contains("Proc-Type: 4,ENCRYPTED"), "{out}");
                variants.push((out, Some("x")));
            }
        }
        for (path, pass) in &variants {
            let text = fs::read_to_string(path).unwrap();
            let v = validate_key_pair(Some(&text), None, *pass).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(v.info.fingerprint, fp, "{path}");
            assert_eq!(type_and_blob(&v.public_key), expected_pub, "{path}");
            let norm = d("normalised");
            write_secret(Path::new(&norm), v.private_key.as_ref().unwrap());
            assert_eq!(keygen_public(Path::new(&norm), Some("")), expected_pub, "{path}");
            if let Some(p) = pass {
                let e = validate_key_pair(Some(&text), None, None).unwrap_err();
                assert_eq!(e.field, KeyPairField::PrivateKey, "{path}");
                assert!(e.message.contains("Encrypted private keys are not allowed"), "{path}: {e}");
                let e = validate_key_pair(Some(&text), None, Some("Wrong-pass")).unwrap_err();
                assert_eq!(e.field, KeyPairField::Passphrase, "{path}: {e}");
                assert_no_leak(&e.message, &text, Some(p));
                assert_no_leak(&e.message, &text, Some("Wrong-pass"));
            } else {
                // Passphrase for an unencrypted key is ignored (gotcha 11).
                let v = validate_key_pair(Some(&text), None, Some("ignored")).unwrap();
                assert_eq!(v.info.fingerprint, fp, "{path}");
            }
        }
    }

    // openssl's classic `ecparam -genkey` output starts with an EC PARAMETERS block.
    let ec = d("ecparam.pem");
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-out", ec.as_str()]);
    let text = fs::read_to_string(&ec).unwrap();
    assert!(text.contains("BEGIN EC PARAMETERS"));
    let v = validate_key_pair(Some(&text), None, None).unwrap();
    assert_eq!(v.info.key_type, "ecdsa-sha2-nistp256");

    // SEC1 with explicit curve parameters instead of the curve's name: the same key as its
    // named-curve form.
    for (curve, key_type) in [
        ("prime256v1", "ecdsa-sha2-nistp256"),
        ("secp384r1", "ecdsa-sha2-nistp384"),
        ("secp521r1", "ecdsa-sha2-nistp521"),
    ] {
        let explicit = d(&format!("{curve}-explicit.pem"));
        let named = d(&format!("{curve}-named.pem"));
        openssl(&["ecparam", "-name", curve, "-genkey", "-noout", "-param_enc", "explicit", "-out", explicit.as_str()]);
        openssl(&["ec", "-in", explicit.as_str(), "-param_enc", "named_curve", "-out", named.as_str()]);
        let text = fs::read_to_string(&explicit).unwrap();
        assert!(text.contains("BEGIN EC PRIVATE KEY") && !text.contains("EC PARAMETERS"), "{text}");
        let v = validate_key_pair(Some(&text), None, None).unwrap_or_else(|e| panic!("{curve}: {e}"));
        let w = validate_key_pair(Some(&fs::read_to_string(&named).unwrap()), None, None).unwrap();
        assert_eq!(v.info.key_type, key_type);
        assert_eq!(v.info.fingerprint, w.info.fingerprint, "{curve}");
    }

    // RSA-1024 from openssl, legacy-encrypted: decrypted, then refused for its size.
    let small = d("rsa1024");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", small.as_str()]);
    let small_enc = d("rsa1024.enc");
    openssl(&[
        "pkey",
        "-in",
        small.as_str(),
        "-traditional",
        "-aes256",
        "-passout",
        "pass:x",
        "-out",
        small_enc.as_str(),
    ]);
    let e = validate_key_pair(Some(&fs::read_to_string(&small_enc).unwrap()), None, Some("x")).unwrap_err();
    assert_eq!(e.field, KeyPairField::PrivateKey);
    assert!(e.message.starts_with("RSA keys must be at least 2048 bits; this key has 1024 bits."));

    // An unsupported curve (secp256k1) gets a clear message.
    let k1 = d("k1.pem");
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1", "-out", k1.as_str()]);
    let e = validate_key_pair(Some(&fs::read_to_string(&k1).unwrap()), None, None).unwrap_err();
    assert_eq!(e.field, KeyPairField::PrivateKey);
    assert!(e.message.contains("Unsupported") || e.message.contains("not supported"), "{e}");
}

/// One ssh-keygen P-256 key in 256 stores its scalar in 31 bytes; it must import.
#[test]
fn ecdsa_p256_key_with_a_short_scalar_imports() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let private = std::fs::read_to_string(format!("{dir}/ecdsa-p256-short-scalar")).unwrap();
    let public = std::fs::read_to_string(format!("{dir}/ecdsa-p256-short-scalar.pub")).unwrap();
    let v = keyhaven_core::keys::validate_key_pair(Some(&private), None, None).expect("short scalar imports");
    let want: Vec<&str> = public.split_whitespace().take(2).collect();
    let got: Vec<&str> = v.public_key.split_whitespace().take(2).collect();
    assert_eq!(got, want, "derived public key equals ssh-keygen's");
    // The normalised key re-imports (ssh-key writes the full 32 bytes).
    let again = keyhaven_core::keys::validate_key_pair(Some(v.private_key.as_ref().unwrap()), None, None).unwrap();
    assert_eq!(again.info.fingerprint, v.info.fingerprint);
}

/// The same short-scalar key with a passphrase, encrypted by ssh-keygen with
/// its default cipher and with the two AEAD ciphers (which carry a tag).
#[test]
fn passphrase_protected_ecdsa_p256_key_with_a_short_scalar_imports() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let private = fs::read_to_string(format!("{fixtures}/ecdsa-p256-short-scalar")).unwrap();
    let public = fs::read_to_string(format!("{fixtures}/ecdsa-p256-short-scalar.pub")).unwrap();
    let want: Vec<&str> = public.split_whitespace().take(2).collect();
    let dir = tempfile::tempdir().unwrap();
    for cipher in ["aes256-ctr", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"] {
        let path = dir.path().join(cipher);
        write_secret(&path, &private);
        run(Command::new("ssh-keygen").args(["-q", "-p", "-P", "", "-N", PASS, "-Z", cipher, "-f"]).arg(&path));
        let text = fs::read_to_string(&path).unwrap();
        // The reason for the repair: ssh-key alone refuses this key after decrypting it.
        let raw = ssh_key::PrivateKey::from_openssh(&text).expect("the encrypted envelope parses");
        assert!(raw.is_encrypted(), "{cipher}: ssh-keygen did not encrypt");
        assert!(raw.decrypt(PASS).is_err(), "{cipher}: ssh-key now reads short scalars; the repair can go");

        let v = validate_key_pair(Some(&text), None, Some(PASS))
            .unwrap_or_else(|e| panic!("{cipher}: short scalar with a passphrase: {e:?}"));
        let got: Vec<&str> = v.public_key.split_whitespace().take(2).collect();
        assert_eq!(got, want, "{cipher}: derived public key equals ssh-keygen's");
        // The stored (decrypted, normalised) key is readable by ssh-keygen.
        let out = dir.path().join(format!("{cipher}.out"));
        write_secret(&out, v.private_key.as_ref().unwrap());
        let derived = run(Command::new("ssh-keygen").arg("-y").arg("-f").arg(&out));
        assert_eq!(derived.split_whitespace().take(2).collect::<Vec<_>>(), want, "{cipher}: ssh-keygen -y");

        let e = validate_key_pair(Some(&text), None, Some("wrong passphrase")).unwrap_err();
        assert_eq!(e.message, "The passphrase does not decrypt this private key", "{cipher}");
        assert_eq!(e.field, KeyPairField::Passphrase, "{cipher}");
    }
}
