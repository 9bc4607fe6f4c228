use keyhaven_core::keys::*;
#[test]
fn scratch() {
    let dir = "/tmp/kt";
    for f in ["dsa", "ed_PEM", "ec_PEM", "rsa_PEM", "ec_PKCS8", "rsa_PKCS8"] {
        let t = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        let n = lines.len();
        let v = [lines[..n-1].join("\n"), format!("{}\n{}\n", lines[..n/2].join("\n"), lines[n-1]), lines[..n/2].join("\n"),
            t.replacen(lines[n / 2], &lines[n / 2][..lines[n / 2].len() / 2], 1),
            t.replacen(lines[n / 2], &lines[n / 2].replace(|c: char| c.is_ascii_alphabetic(), "A"), 1),
            t[..t.len()/2].to_string()];
        println!("{f} full nopass: {:?}", validate_key_pair(Some(&t), None, None).map(|v| v.info));
        println!("{f} full pass: {:?}", validate_key_pair(Some(&t), None, Some("secret")).map(|v| v.info));
        for (i, b) in v.iter().enumerate() {
            println!("{f} v{i}: {:?}", validate_key_pair(Some(b), None, Some("secret")).map(|v| v.info));
        }
    }
    for s in ["", "   ", "garbage", "ssh-ed25519", "ssh-ed25519 AAAA", "-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN OPENSSH PRIVATE KEY-----\n-----END OPENSSH PRIVATE KEY-----", "ключ", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "-----BEGIN FOO PRIVATE KEY-----\nAAAA\n-----END FOO PRIVATE KEY-----"] {
        println!("{s:?} priv: {:?}", validate_key_pair(Some(s), None, None).map(|v| v.info));
        println!("{s:?} pub: {:?}", validate_key_pair(None, Some(s), None).map(|v| v.info));
        println!("{s:?} hk: {:?}", parse_host_key_lines(s));
    }
}
