mod client_fixture;
use std::time::{Duration, Instant};
use keyhaven_ssh::client::*;
use zeroize::Zeroizing;

#[tokio::test]
async fn timing() {
    let sshd = client_fixture::start().unwrap();
    let key = sshd.client_key("ed25519", "id");
    sshd.authorize("root", "id");
    let t = TestTarget { host: "127.0.0.1".into(), port: sshd.port, username: "root".into(),
        private_key_openssh: Zeroizing::new(key.clone()),
        pinned_host_keys: vec![sshd.host_key("ed25519")], timeout: Duration::from_secs(5) };
    for _ in 0..6 {
        let s = Instant::now();
        let r = test_connection(&t).await;
        assert!(r.ok);
        let a = s.elapsed();
        let s = Instant::now();
        scan_host_keys("127.0.0.1", sshd.port, Duration::from_secs(5)).await.unwrap();
        println!("test {:?} scan {:?}", a, s.elapsed());
    }
}
