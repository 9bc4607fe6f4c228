//! Bad input for every method: wrong types, missing and unknown fields, huge
//! strings, unknown ids. Each answer is a field-named error (never a panic or a
//! dropped connection) and the store is unchanged.

use serde_json::{json, Value};

use crate::util::*;

/// A valid public key for the rows that need one.
const ED25519_PUB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9NKyrphVtBRFeWkXgnZ3hhUazR6Xdy3l1nQw8wIq7n";

/// Method, params, expected attribute (prefix match) and message fragment.
fn table() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let huge = "h".repeat(5000);
    vec![
        // Control characters are refused with the character named, never cleaned.
        (
            "keychaincredential.create",
            json!([{"name": "nul\u{0}name", "type": "SSH_KEY_PAIR", "attributes": {"public_key": ED25519_PUB}}]),
            "keychain_credential_create.name",
            "Contains a control character (U+0000); remove it",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "k", "type": "SSH_KEY_PAIR", "attributes": {"public_key": format!("{ED25519_PUB} co\u{0}mment")}}]),
            "keychain_credential_create.attributes.public_key",
            "Line 1: contains a control character (U+0000); remove it",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "k", "type": "SSH_KEY_PAIR", "attributes": {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\u{0}NzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----\n"}}]),
            "keychain_credential_create.attributes.private_key",
            "Line 2: contains a control character (U+0000)",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "c", "type": "SSH_CREDENTIALS", "attributes": {"host": "h\nx", "private_key": 1, "remote_host_key": ""}}]),
            "keychain_credential_create.attributes.host",
            "(U+000A)",
        ),
        ("api_key.create", json!([{"name": "line\nbreak", "username": "admin"}]), "api_key_create.name", "(U+000A)"),
        (
            "api_key.create",
            json!([{"name": "sep\u{2028}", "username": "admin"}]),
            "api_key_create.name",
            "line separator (U+2028)",
        ),
        (
            "user.create",
            json!([{"username": "ctrlname", "full_name": "Evil\u{1b}[2J", "password_disabled": true}]),
            "user_create.full_name",
            "(U+001B)",
        ),
        (
            "ssh.update",
            json!([{"options": "MaxAuthTries 3\u{7}"}]),
            "ssh_update.options",
            "Line 1: contains a control character (U+0007)",
        ),
        ("auth.login_ex", json!([]), "auth_login_ex.login_data", "Field required"),
        ("auth.login_ex", json!(["x"]), "auth_login_ex.login_data", "valid dictionary"),
        ("auth.login_ex", json!([{}]), "auth_login_ex.login_data.mechanism", "Field required"),
        ("auth.login_ex", json!([{"mechanism": "MAGIC"}]), "auth_login_ex.login_data.mechanism", "PASSWORD_PLAIN"),
        ("auth.login_ex", json!([{"mechanism": 1}]), "auth_login_ex.login_data.mechanism", "valid string"),
        (
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": "a"}]),
            "auth_login_ex.login_data.password",
            "Field required",
        ),
        (
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": "a", "password": "b", "x": 1}]),
            "auth_login_ex.login_data.x",
            "Extra inputs",
        ),
        (
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": 1, "password": "b"}]),
            "auth_login_ex.login_data.username",
            "valid string",
        ),
        (
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": huge, "password": "b"}]),
            "auth_login_ex.login_data.username",
            "at most 1024",
        ),
        ("auth.login_ex", json!([{"mechanism": "TOKEN_PLAIN"}]), "auth_login_ex.login_data.token", "Field required"),
        (
            "auth.login_ex",
            json!([{"mechanism": "API_KEY_PLAIN", "username": "a", "api_key": 5}]),
            "auth_login_ex.login_data.api_key",
            "valid string",
        ),
        (
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": "a", "password": "b", "login_options": {"user_info": "yes"}}]),
            "auth_login_ex.login_data.login_options.user_info",
            "valid boolean",
        ),
        ("auth.login", json!([1, "x"]), "auth_login.username", "valid string"),
        ("auth.login", json!(["admin"]), "auth_login.password", "Field required"),
        ("auth.login", json!(["a", "b", "c", "d"]), "auth.login", "Too many arguments"),
        ("auth.login_with_api_key", json!([]), "auth_login_with_api_key.api_key", "Field required"),
        ("auth.login_with_token", json!([{}]), "auth_login_with_token.token", "valid string"),
        ("auth.generate_token", json!([true]), "auth_generate_token.ttl", "valid integer"),
        ("auth.generate_token", json!([60, []]), "auth_generate_token.attrs", "valid dictionary"),
        ("auth.generate_token", json!([60, {}, "no"]), "auth_generate_token.match_origin", "valid boolean"),
        ("api_key.create", json!([]), "api_key_create", "Field required"),
        ("api_key.create", json!([{"name": "n"}]), "api_key_create.username", "Field required"),
        (
            "api_key.create",
            json!([{"name": "n", "username": "admin", "readonly": true}]),
            "api_key_create.readonly",
            "Extra inputs",
        ),
        ("api_key.create", json!([{"name": "", "username": "admin"}]), "api_key_create.name", "empty"),
        ("api_key.create", json!([{"name": huge, "username": "admin"}]), "api_key_create.name", "at most 1024"),
        ("api_key.delete", json!(["1"]), "api_key_delete.id", "valid integer"),
        ("api_key.delete", json!([123456]), "", "API key 123456 does not exist"),
        ("api_key.query", json!(["x"]), "api_key_query.filters", ""),
        ("api_key.query", json!([[["name", "~~", "x"]]]), "api_key_query.filters", ""),
        ("api_key.query", json!([[], {"limit": "5"}]), "api_key_query.options.limit", ""),
        ("api_key.query", json!([[], {"bogus": 1}]), "api_key_query.options.bogus", "Extra inputs"),
        ("audit.query", json!([[["event", "=", "x", "y"]]]), "audit_query.filters", ""),
        ("audit.query", json!([{"query-filters": [], "junk": 1}]), "audit_query.junk", "Extra inputs"),
        ("core.get_jobs", json!([[["id", "~", "("]]]), "core.get_jobs.filters", ""),
        ("core.ping", json!([1]), "core.ping", "Too many arguments"),
        ("core.subscribe", json!([]), "core_subscribe.event", "Field required"),
        ("core.subscribe", json!([["core.get_jobs"]]), "core_subscribe.event", "non-empty string"),
        ("auth.set_attribute", json!([]), "auth_set_attribute.key", "Field required"),
        ("auth.set_attribute", json!([5, 1]), "auth_set_attribute.key", "valid string"),
        ("auth.set_attribute", json!(["k"]), "auth_set_attribute.value", "Field required"),
        ("auth.set_attribute", json!([huge, 1]), "auth_set_attribute.key", ""),
        (
            "keychaincredential.re_pair_ssh_connection",
            json!(["x"]),
            "keychain_re_pair_ssh_connection.id",
            "valid integer",
        ),
        (
            "keychaincredential.re_pair_ssh_connection",
            json!([1]),
            "keychain_re_pair_ssh_connection.options",
            "Field required",
        ),
        (
            "keychaincredential.re_pair_ssh_connection",
            json!([1, {"semi_automatic_setup": {"url": "https://h"}, "bogus": 1}]),
            "keychain_re_pair_ssh_connection.options.bogus",
            "Extra inputs",
        ),
        (
            "keychaincredential.re_pair_ssh_connection",
            json!([987654, {"semi_automatic_setup": {"url": "https://h"}}]),
            "",
            "KeychainCredential 987654 does not exist",
        ),
    ]
}

#[tokio::test]
async fn every_method_rejects_bad_input_with_field_errors_and_changes_nothing() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    a.call("api_key.create", json!([{"name": "existing", "username": "admin"}])).await;
    let kp = a
        .call(
            "keychaincredential.create",
            json!([{"name": "existing", "type": "SSH_KEY_PAIR", "attributes": {"public_key": ED25519_PUB}}]),
        )
        .await;
    let admin = a.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await;
    let before_keys = a.call("api_key.query", json!([])).await;
    let before_tokens_ok = a.call("auth.me", json!([])).await;
    let before_credentials = a.call("keychaincredential.query", json!([])).await;
    let before_users = a.call("user.query", json!([])).await;
    let before_ssh = a.call("ssh.config", json!([])).await;

    // Rows that need the ids of what was just made.
    let mut rows = table();
    rows.extend([
        (
            "keychaincredential.update",
            json!([kp["id"], {"name": "tab\tname"}]),
            "keychain_credentials_update.name",
            "Contains a control character (U+0009); remove it",
        ),
        (
            "user.update",
            json!([admin["id"], {"sshpubkey": format!("{ED25519_PUB}\n# note\u{0}\n")}]),
            "user_update.sshpubkey",
            "Line 2: contains a control character (U+0000); remove it",
        ),
        ("user.update", json!([admin["id"], {"full_name": "Admin\u{7f}"}]), "user_update.full_name", "(U+007F)"),
    ]);
    for (method, params, attr, msg) in rows {
        let e = a.err(method, params.clone()).await;
        let ex = extra(&e);
        assert!(
            ex.iter().any(|(at, m)| at.starts_with(attr) && m.contains(msg)),
            "{method} {params}: expected [{attr}…] containing {msg:?}, got {ex:?}"
        );
        assert_eq!(e["data"]["errname"], "EINVAL");
    }
    // The connection survived every bad call and is still logged in as admin.
    assert_eq!(a.call("auth.me", json!([])).await, before_tokens_ok);
    assert_eq!(a.call("api_key.query", json!([])).await, before_keys, "bad input changed the store");
    assert_eq!(
        a.call("keychaincredential.query", json!([])).await,
        before_credentials,
        "bad input changed a credential"
    );
    assert_eq!(a.call("user.query", json!([])).await, before_users, "bad input changed an account");
    assert_eq!(a.call("ssh.config", json!([])).await, before_ssh, "bad input changed the SSH settings");
}
