//! Keychain credentials: SSH key pairs and SSH connections (`SSH_CREDENTIALS`),
//! sharing one name space as in TrueNAS. Validation, normalisation, used-by
//! tracking and cascade deletes live here; key parsing is the domain's.
//!
//! Entries are typed ([`KeychainEntry`]) and cached in memory without their
//! private keys (patched after each write) so that `keychaincredential.query` filters thousands of credentials
//! without touching SQLite or decrypting anything it will not return.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

use super::input::{self, Secret, SecretText, SshEndpoint};
use super::session::Role;
use super::App;
use crate::error::{ServiceError, EINVAL, ENOENT};
use keyhaven_core::error::{FieldError, ValidationErrors};
use keyhaven_core::keys::{self, GenerateOptions, KeyAlgorithm};

pub const SSH_KEY_PAIR: &str = "SSH_KEY_PAIR";
pub const SSH_CREDENTIALS: &str = "SSH_CREDENTIALS";
pub const REDACTED: &str = "********";

/// Cached entries (private keys left null) and the ids that do have one.
pub struct KeychainCache {
    inner: RwLock<Option<Arc<Cached>>>,
    /// Held across check-then-write (name uniqueness, used_by before a
    /// delete) so two writers cannot interleave between the check and the write.
    writes: std::sync::Mutex<()>,
    /// Passphrase KDFs running at once (half the cores: the rest keep serving).
    kdf_slots: tokio::sync::Semaphore,
    /// What the reconcile knows of the cache (PostgreSQL; see
    /// [`Keychain::follow_shared_state`]). Taken last, briefly.
    sync: std::sync::Mutex<CacheSync>,
    /// One reconcile at a time (the sync loop runs them one after another;
    /// this keeps `sync.touched` one recording).
    reconciling: std::sync::Mutex<()>,
}

/// How the cache stands with the database's keychain table.
#[derive(Default)]
struct CacheSync {
    /// The table's change count ([`keyhaven_store::Store::keychain_version`])
    /// read before the rows the cache was last built from: every change up
    /// to it is in the cache (patches since only add later ones). `None`:
    /// unknown (SQLite, or not built yet).
    version: Option<i64>,
    /// While a reconcile reads the rows outside the write lock: the ids
    /// patched into the current cache meanwhile, patched again into the new
    /// one before it replaces the current one (else a local write made
    /// after the read would vanish from the cache).
    touched: Option<Vec<i64>>,
}

/// What a full reconcile of the cache did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// No cache built yet: nothing to compare (the next reader builds it).
    NotBuilt,
    /// The table's change count is the one the cache was built at.
    Unchanged,
    /// Rows read again and the new cache swapped in.
    Rebuilt,
}

impl Reconciled {
    pub fn as_str(self) -> &'static str {
        match self {
            Reconciled::NotBuilt => "not_built",
            Reconciled::Unchanged => "unchanged",
            Reconciled::Rebuilt => "rebuilt",
        }
    }
}

impl Default for KeychainCache {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        KeychainCache {
            inner: RwLock::default(),
            writes: std::sync::Mutex::default(),
            kdf_slots: tokio::sync::Semaphore::new((cores / 2).max(1)),
            sync: std::sync::Mutex::default(),
            reconciling: std::sync::Mutex::default(),
        }
    }
}

#[derive(Clone, Default)]
pub struct Cached {
    /// In id order; typed entries (private keys never held here).
    entries: Vec<Arc<KeychainEntry>>,
    pub with_private: HashSet<i64>,
    /// name → id (uniqueness checks and the `name =` fast path).
    pub names: HashMap<String, i64>,
    /// SSH_CREDENTIALS id → the key pair it uses (`used_by`).
    pub connection_keys: HashMap<i64, i64>,
}

impl Cached {
    fn pos(&self, id: i64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&id, |e| e.id())
    }

    pub fn contains(&self, id: i64) -> bool {
        self.pos(id).is_ok()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One entry (private key left out).
    pub fn get(&self, id: i64) -> Option<&KeychainEntry> {
        self.pos(id).ok().map(|i| &*self.entries[i])
    }

    /// All entries, in id order (private keys left out).
    pub fn iter(&self) -> impl Iterator<Item = &KeychainEntry> {
        self.entries.iter().map(|e| &**e)
    }

    fn remove(&mut self, id: i64) {
        if let Ok(i) = self.pos(id) {
            let old = self.entries.remove(i);
            if self.names.get(old.name()) == Some(&id) {
                self.names.remove(old.name());
            }
        }
        self.with_private.remove(&id);
        self.connection_keys.remove(&id);
    }

    fn put(&mut self, r: &keyhaven_store::KeychainRecord) {
        self.remove(r.id);
        if r.has_private_key {
            self.with_private.insert(r.id);
        }
        self.names.insert(r.name.clone(), r.id);
        let entry = KeychainEntry::from_record(r);
        if let Some(Shown::Full(a)) = entry.connection().map(|c| &c.attributes) {
            self.connection_keys.insert(r.id, a.private_key);
        }
        let i = self.pos(r.id).unwrap_or_else(|i| i);
        self.entries.insert(i, Arc::new(entry));
    }
}

/// SSH_KEY_PAIR attributes as given by a caller (TrueNAS's shape, decoded
/// as is). The private key and the passphrase stay in secret types: `Debug`
/// shows neither, and both are zeroed when dropped.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPairInput {
    #[serde(default)]
    pub private_key: Option<SecretText>,
    #[serde(default)]
    pub public_key: Option<String>,
    /// keyhaven extension: decrypts a passphrase-protected import; never stored.
    #[serde(default)]
    pub passphrase: Option<Secret>,
}

/// SSH_CREDENTIALS attributes as given by a caller (TrueNAS's shape and
/// defaults, decoded as is; ranges and lines are checked by the keychain).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionInput {
    #[serde(flatten)]
    pub endpoint: SshEndpoint,
    #[serde(default = "input::default_username", deserialize_with = "input::capped")]
    pub username: String,
    pub private_key: i64,
    pub remote_host_key: String,
}

pub enum AttributesInput {
    KeyPair(KeyPairInput),
    /// A key pair already parsed and checked (see [`Keychain::check_key_material`]).
    CheckedKeyPair(keys::ValidatedKeyPair),
    Connection(ConnectionInput),
}

/// One `used_by` row, with the id it refers to (for cascades).
pub struct Dependent {
    pub id: i64,
    pub title: String,
    pub unbind_method: &'static str,
    /// An rsync task (disabled by a cascade) rather than a credential (deleted).
    pub task: bool,
}

/// Keychain credentials (`keychaincredential.*`): key pairs and SSH
/// connections, their cache and the writes that keep it in line with the store.
pub struct Keychain<'a> {
    app: &'a App,
}

impl<'a> Keychain<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Keychain { app }
    }

    fn cached(&self) -> Result<Arc<Cached>, ServiceError> {
        if let Some(c) = self.app.keychain.inner.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        let mut guard = self.app.keychain.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        // The change count before the rows: the rows hold at least every change up to it.
        let version = self.app.store.keychain_version()?;
        let c = Arc::new(self.read_all()?);
        *guard = Some(c.clone());
        self.sync().version = version;
        Ok(c)
    }

    /// Every row, as a fresh cache.
    fn read_all(&self) -> Result<Cached, ServiceError> {
        let mut c = Cached::default();
        for r in self.app.store.keychain_list()? {
            c.put(&r);
        }
        Ok(c)
    }

    fn sync(&self) -> std::sync::MutexGuard<'_, CacheSync> {
        self.app.keychain.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bring the cache in line with the store after a write to rows `ids`:
    /// patched in place (a full rebuild per write made bulk inserts quadratic).
    /// On any doubt the cache is dropped and rebuilt by the next reader.
    fn changed(&self, ids: &[i64]) {
        let mut guard = self.app.keychain.inner.write().unwrap_or_else(|p| p.into_inner());
        let Some(arc) = guard.as_mut() else { return };
        if let Some(t) = self.sync().touched.as_mut() {
            t.extend_from_slice(ids);
        }
        let cached = Arc::make_mut(arc);
        for &id in ids {
            match self.app.store.keychain_get(id) {
                Ok(Some(r)) => cached.put(&r),
                Ok(None) => cached.remove(id),
                Err(_) => {
                    *guard = None;
                    return;
                }
            }
        }
    }

    /// Another node changed credentials `ids`: patch those rows. Under the
    /// write lock, so a local write cannot interleave and be overwritten by
    /// an older read. A cache not built yet stays so.
    pub fn follow_shared_state(&self, ids: &std::collections::BTreeSet<i64>) -> Result<(), ServiceError> {
        let _writes = self.app.keychain.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.changed(&ids.iter().copied().collect::<Vec<_>>());
        Ok(())
    }

    /// The full reconcile (after a missed notification, at start and every
    /// 30 s): compare the table's change count with the one the cache was
    /// built at and stop there when they are equal, the usual case. Else
    /// read every row into a new cache *outside* the write lock (writes go
    /// on meanwhile; the ids they patch are recorded), then, under the lock,
    /// patch those ids into the new cache and swap it in: the lock is held
    /// for the few rows written during the read, not for the whole table.
    /// On SQLite (no change count) it always rebuilds; nothing calls it there.
    pub fn reconcile(&self) -> Result<Reconciled, ServiceError> {
        let _one = self.app.keychain.reconciling.lock().unwrap_or_else(|p| p.into_inner());
        if self.app.keychain.inner.read().unwrap_or_else(|p| p.into_inner()).is_none() {
            return Ok(Reconciled::NotBuilt);
        }
        // The count first: the rows read after it hold at least every change up to it.
        let version = self.app.store.keychain_version()?;
        {
            let mut sync = self.sync();
            if version.is_some() && sync.version == version {
                return Ok(Reconciled::Unchanged);
            }
            sync.touched = Some(Vec::new());
        }
        let built = self.read_all();
        let _writes = self.app.keychain.writes.lock().unwrap_or_else(|p| p.into_inner());
        let touched = self.sync().touched.take().unwrap_or_default();
        let mut c = built?;
        for id in touched.into_iter().collect::<std::collections::BTreeSet<_>>() {
            match self.app.store.keychain_get(id)? {
                Some(r) => c.put(&r),
                None => c.remove(id),
            }
        }
        let mut guard = self.app.keychain.inner.write().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            // Dropped meanwhile (a patch failed): the next reader builds it afresh.
            return Ok(Reconciled::NotBuilt);
        }
        *guard = Some(Arc::new(c));
        self.sync().version = version;
        Ok(Reconciled::Rebuilt)
    }

    /// Entries without private keys (for filtering).
    pub fn entries(&self) -> Result<Arc<Cached>, ServiceError> {
        self.cached()
    }

    /// Fill in `attributes.private_key` of a key-pair entry from the store.
    fn fill_private(&self, entry: &mut KeychainEntry, cached: &Cached) -> Result<(), ServiceError> {
        if let KeychainEntry::KeyPair(KeyPairEntry { id, attributes: Shown::Full(a), .. }) = entry {
            if cached.with_private.contains(id) {
                a.private_key = self.app.store.keychain_private_key(*id)?;
            }
        }
        Ok(())
    }

    /// One entry as a caller sees it: full admins get its private key (if
    /// any), read-only callers no attributes.
    fn view(&self, e: &KeychainEntry, cached: &Cached, full: bool) -> Result<KeychainEntry, ServiceError> {
        let mut v = e.view(full);
        if full {
            self.fill_private(&mut v, cached)?;
        }
        Ok(v)
    }

    /// One entry with its private key (if any).
    pub fn get(&self, id: i64) -> Result<KeychainEntry, ServiceError> {
        let cached = self.cached()?;
        self.view(cached.get(id).ok_or_else(|| not_found(id))?, &cached, true)
    }

    /// `keychaincredential.get_of_type` (TrueNAS's private method, also what
    /// setup uses): one entry with its private key, refused with TrueNAS's
    /// call errors when it does not exist or is not of type `kind`.
    pub fn get_of_type(&self, id: i64, kind: &str) -> Result<KeychainEntry, ServiceError> {
        let cached = self.cached()?;
        let e = cached.get(id).ok_or_else(|| ServiceError::call(ENOENT, "Credential does not exist"))?;
        if (if e.is_key_pair() { SSH_KEY_PAIR } else { SSH_CREDENTIALS }) != kind {
            return Err(ServiceError::call(EINVAL, format!("Credential is not of type {kind}")));
        }
        self.view(e, &cached, true)
    }

    fn name_taken(&self, name: &str, except: Option<i64>) -> Result<bool, ServiceError> {
        let cached = self.cached()?;
        Ok(cached.names.get(name).is_some_and(|id| Some(*id) != except))
    }

    /// The private key of a key pair, for use (connections, downloads).
    pub fn private_key(&self, id: i64) -> Result<Option<Zeroizing<String>>, ServiceError> {
        Ok(self.app.store.keychain_private_key(id)?)
    }

    /// Parse a passphrase-protected private key before any lock is taken: its
    /// KDF (bcrypt-pbkdf; seconds for `ssh-keygen -a 1000`) runs on a blocking
    /// thread, at most one per core at a time, never on the async workers nor
    /// under the keychain's write lock. Other input passes through unchanged.
    pub async fn check_key_material(&self, attrs: AttributesInput) -> Result<AttributesInput, ServiceError> {
        let kp = match attrs {
            AttributesInput::KeyPair(kp) if kp.passphrase.as_ref().is_some_and(|p| !p.expose().is_empty()) => kp,
            other => return Ok(other),
        };
        let _slot = self.app.keychain.kdf_slots.acquire().await.map_err(|e| ServiceError::internal("key import", e))?;
        let v = tokio::task::spawn_blocking(move || {
            let pass = kp.passphrase.as_ref().map(|p| Zeroizing::new(p.expose().to_string()));
            keys::validate_key_pair(
                kp.private_key.as_ref().map(|s| s.0.expose_secret()).filter(|s| !s.trim().is_empty()),
                kp.public_key.as_deref().filter(|s| !s.trim().is_empty()),
                pass.as_deref().map(|s| s.as_str()),
            )
        })
        .await
        .map_err(|e| ServiceError::internal("key import", e))?
        .map_err(|e| ServiceError::Validation(FieldError::from(e).prefixed("attributes").into()))?;
        Ok(AttributesInput::CheckedKeyPair(v))
    }

    /// Validate and store a new credential; returns the stored entry.
    pub async fn create(&self, name: &str, attrs: AttributesInput) -> Result<KeychainEntry, ServiceError> {
        // TrueNAS reports a taken name before anything else; checked again under the lock.
        if !name.trim().is_empty() && self.name_taken(name, None)? {
            return Err(ServiceError::field("name", "Object with this name already exists"));
        }
        let attrs = self.check_key_material(attrs).await?;
        let (out, durable) = self.app.store.deferring_sync(|| self.create_now(name, attrs));
        wait_durable(durable).await;
        out
    }

    fn create_now(&self, name: &str, attrs: AttributesInput) -> Result<KeychainEntry, ServiceError> {
        let _writes = self.app.keychain.writes.lock().unwrap_or_else(|p| p.into_inner());
        if name.trim().is_empty() {
            return Err(ServiceError::field("name", "String should have at least 1 character"));
        }
        check_name(name)?;
        // TrueNAS checks the name first and stops there when it is taken.
        if self.name_taken(name, None)? {
            return Err(ServiceError::field("name", "Object with this name already exists"));
        }
        let (kind, attributes, private) = self.validate_attributes(attrs, None)?;
        let id = self.app.store.keychain_insert(name, kind, &attributes, private.as_deref().map(|s| s.as_str()));
        if let Ok(id) = &id {
            self.changed(&[*id]);
        }
        let id = id.map_err(|e| match e {
            keyhaven_store::StoreError::Conflict(_) => {
                ServiceError::field("name", "Object with this name already exists")
            }
            other => other.into(),
        })?;
        self.get(id)
    }

    /// Replace name and/or attributes of a credential (type cannot change).
    pub async fn update(
        &self,
        id: i64,
        name: Option<&str>,
        attrs: Option<AttributesInput>,
    ) -> Result<KeychainEntry, ServiceError> {
        let attrs = match attrs {
            Some(a) => Some(self.check_key_material(a).await?),
            None => None,
        };
        let (out, durable) = self.app.store.deferring_sync(|| self.update_now(id, name, attrs));
        wait_durable(durable).await;
        out
    }

    fn update_now(
        &self,
        id: i64,
        name: Option<&str>,
        attrs: Option<AttributesInput>,
    ) -> Result<KeychainEntry, ServiceError> {
        let _writes = self.app.keychain.writes.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.app.store.keychain_get(id)?.ok_or_else(|| not_found(id))?;
        let name = name.unwrap_or(&rec.name).to_string();
        if name.trim().is_empty() {
            return Err(ServiceError::field("name", "String should have at least 1 character"));
        }
        check_name(&name)?;
        if self.name_taken(&name, Some(id))? {
            return Err(ServiceError::field("name", "Object with this name already exists"));
        }
        let (attributes, private) = match attrs {
            None => (rec.attributes.clone(), self.app.store.keychain_private_key(id)?),
            Some(a) => {
                let (kind, attributes, private) = self.validate_attributes(a, Some(id))?;
                if kind != rec.kind {
                    return Err(ServiceError::field(
                        "attributes",
                        format!("This credential is of type {}; its type cannot be changed", rec.kind),
                    ));
                }
                if private.is_none() && rec.has_private_key && !self.used_by(id)?.is_empty() {
                    return Err(ServiceError::field(
                        "attributes.private_key",
                        "SSH connections use this key pair: keep its private key (or delete those connections first)",
                    ));
                }
                (attributes, private)
            }
        };
        let r = self.app.store.keychain_update(id, &name, &attributes, private.as_deref().map(|s| s.as_str()));
        self.changed(&[id]);
        r.map_err(|e| match e {
            keyhaven_store::StoreError::Conflict(_) => {
                ServiceError::field("name", "Object with this name already exists")
            }
            other => other.into(),
        })?;
        self.get(id)
    }

    fn validate_attributes(
        &self,
        attrs: AttributesInput,
        self_id: Option<i64>,
    ) -> Result<(&'static str, Value, Option<Zeroizing<String>>), ServiceError> {
        let prefix = "attributes";
        match attrs {
            AttributesInput::KeyPair(kp) => {
                let pass = kp.passphrase.as_ref().map(|p| Zeroizing::new(p.expose().to_string()));
                let v = keys::validate_key_pair(
                    kp.private_key.as_ref().map(|s| s.0.expose_secret()).filter(|s| !s.trim().is_empty()),
                    kp.public_key.as_deref().filter(|s| !s.trim().is_empty()),
                    pass.as_deref().map(|s| s.as_str()),
                )
                .map_err(|e| ServiceError::Validation(FieldError::from(e).prefixed(prefix).into()))?;
                key_pair_attributes(v)
            }
            AttributesInput::CheckedKeyPair(v) => key_pair_attributes(v),
            AttributesInput::Connection(c) => {
                let mut errs = ValidationErrors::new();
                let (ep, username) = (&c.endpoint, &c.username);
                if ep.host.trim().is_empty() {
                    errs.add(format!("{prefix}.host"), "Host must not be empty");
                }
                for (field, value) in [("host", &ep.host), ("username", username)] {
                    if let Err(e) = keyhaven_core::text::check_single_line(value) {
                        errs.add(format!("{prefix}.{field}"), e.to_string());
                    }
                }
                if username.trim().is_empty() {
                    errs.add(format!("{prefix}.username"), "Username must not be empty");
                }
                errs.take_all(prefix, ep.check());
                match self.app.store.keychain_get(c.private_key)? {
                    Some(r) if r.kind == SSH_KEY_PAIR && r.has_private_key => {}
                    Some(r) if r.kind == SSH_KEY_PAIR => errs.add(
                        format!("{prefix}.private_key"),
                        format!("SSH key pair {} has no private key; import its private key first", r.name),
                    ),
                    Some(_) if Some(c.private_key) == self_id => {
                        errs.add(format!("{prefix}.private_key"), "A connection cannot use itself as its key pair")
                    }
                    Some(r) => errs.add(
                        format!("{prefix}.private_key"),
                        format!("Credential {} ({}) is not an SSH key pair", c.private_key, r.name),
                    ),
                    None => errs.push(
                        FieldError::new(
                            format!("{prefix}.private_key"),
                            format!("SSH key pair {} does not exist", c.private_key),
                        )
                        .with_errno(ENOENT),
                    ),
                }
                let mut host_keys = Vec::new();
                match keys::parse_host_key_lines(&c.remote_host_key) {
                    Ok(lines) => host_keys = lines,
                    Err((line, msg)) => errs.add(format!("{prefix}.remote_host_key"), format!("Line {line}: {msg}")),
                }
                errs.check()?;
                let remote_host_key = host_keys.iter().map(|h| h.to_line()).collect::<Vec<_>>().join("\n");
                let attributes = ConnectionAttributes {
                    host: ep.host.trim(),
                    port: ep.port,
                    username,
                    private_key: c.private_key,
                    remote_host_key,
                    connect_timeout: ep.connect_timeout,
                };
                Ok((SSH_CREDENTIALS, stored(&attributes)?, None))
            }
        }
    }

    /// What uses a credential, recursively (TrueNAS `used_by`).
    pub fn used_by(&self, id: i64) -> Result<Vec<Dependent>, ServiceError> {
        let cached = self.cached()?;
        let me = cached.get(id).ok_or_else(|| not_found(id))?;
        let mut out = Vec::new();
        let tasks = |conn: i64, out: &mut Vec<Dependent>| -> Result<(), ServiceError> {
            for (task, title) in self.app.rsync().tasks_using(conn)? {
                out.push(Dependent { id: task, title, unbind_method: "disable", task: true });
            }
            Ok(())
        };
        if me.is_key_pair() {
            let mut users: Vec<i64> =
                cached.connection_keys.iter().filter(|(_, k)| **k == id).map(|(c, _)| *c).collect();
            users.sort_unstable();
            for c in users {
                let name = cached.get(c).map(KeychainEntry::name).unwrap_or_default();
                out.push(Dependent {
                    id: c,
                    title: format!("SSH credentials {name}"),
                    unbind_method: "delete",
                    task: false,
                });
                // A connection's own dependents: the rsync tasks that use it.
                tasks(c, &mut out)?;
            }
        } else {
            tasks(id, &mut out)?;
        }
        Ok(out)
    }

    /// Delete a credential; with `cascade`, its dependents too, all in one transaction.
    pub fn delete(&self, id: i64, cascade: bool) -> Result<String, ServiceError> {
        let _writes = self.app.keychain.writes.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.app.store.keychain_get(id)?.ok_or_else(|| not_found(id))?;
        let deps = self.used_by(id)?;
        if !deps.is_empty() && !cascade {
            return Err(ServiceError::field(
                "options.cascade",
                "This credential is used and no cascade option is specified",
            ));
        }
        let mut ids: Vec<i64> = deps.iter().filter(|d| !d.task).map(|d| d.id).collect();
        ids.push(id);
        // Tasks that used a deleted connection are disabled and unbound in the same transaction.
        let r = self.app.store.keychain_delete_unbinding_tasks(&ids);
        self.changed(&ids);
        self.app.rsync().schedules_changed();
        r?;
        Ok(rec.name)
    }

    /// Generate a key pair (RSA off the async executor). Nothing is stored.
    /// Errors name the option (`size`): the caller places them.
    pub async fn generate_key_pair(&self, opts: GenerateOptions) -> Result<keys::KeyPairText, ServiceError> {
        keys::validate_generate_options(&opts).map_err(ServiceError::from)?;
        // RSA keygen searches for primes and can take seconds: never on the executor.
        let out = if opts.algorithm == KeyAlgorithm::Rsa {
            tokio::task::spawn_blocking(move || keys::generate(&opts))
                .await
                .map_err(|e| ServiceError::internal("key generation", e))?
        } else {
            keys::generate(&opts)
        };
        out.map_err(ServiceError::from)
    }
}

/// A credential name is one line of printable text: it is shown in tables,
/// logs and download file names (rule: `keyhaven_core::text`).
fn check_name(name: &str) -> Result<(), ServiceError> {
    keyhaven_core::text::check_single_line(name).map_err(|e| ServiceError::field("name", e.to_string()))
}

pub fn not_found(id: i64) -> ServiceError {
    ServiceError::Validation(
        FieldError::new("", format!("KeychainCredential {id} does not exist")).with_errno(ENOENT).into(),
    )
}

/// Wait, off the async workers, until writes made under the keychain's lock
/// are durable: the lock is released first, so concurrent writers share fsyncs.
async fn wait_durable(t: keyhaven_store::SyncTicket) {
    if !t.is_done() {
        let _ = tokio::task::spawn_blocking(move || t.wait()).await;
    }
}

/// The stored `attributes` of an `SSH_KEY_PAIR` (TrueNAS field names plus
/// keyhaven's additive `key_type`/`algorithm`/`bits`/`comment`/`fingerprint`).
/// The private key is never stored here: it is sealed apart and filled in
/// per reader (`fill_private`), so `private_key` is always null.
#[derive(Serialize)]
struct KeyPairAttributes<'a> {
    private_key: Option<&'a str>,
    public_key: &'a str,
    key_type: &'a str,
    algorithm: &'static str,
    bits: u32,
    comment: &'a str,
    fingerprint: &'a str,
}

/// The stored `attributes` of an `SSH_CREDENTIALS` connection (TrueNAS
/// field names; `private_key` is the id of the key pair it uses).
#[derive(Serialize)]
struct ConnectionAttributes<'a> {
    host: &'a str,
    port: i64,
    username: &'a str,
    private_key: i64,
    remote_host_key: String,
    connect_timeout: i64,
}

/// Attributes as the store keeps them (JSON text in the credential row).
fn stored<T: Serialize>(attributes: &T) -> Result<Value, ServiceError> {
    serde_json::to_value(attributes).map_err(|e| ServiceError::internal("encoding credential attributes", e))
}

/// The stored attributes of a checked key pair, and its private key to seal.
fn key_pair_attributes(
    v: keys::ValidatedKeyPair,
) -> Result<(&'static str, Value, Option<Zeroizing<String>>), ServiceError> {
    let attributes = stored(&KeyPairAttributes {
        private_key: None,
        public_key: &v.public_key,
        key_type: &v.info.key_type,
        algorithm: v.info.algorithm.as_str(),
        bits: v.info.bits,
        comment: &v.info.comment,
        fingerprint: &v.info.fingerprint,
    })?;
    Ok((SSH_KEY_PAIR, attributes, v.private_key))
}

// ------------------------------------------------------------ reading, per role

impl<'a> Keychain<'a> {
    /// `keychaincredential.query` as a caller of `role` may see it: read-only
    /// callers get no attributes (and cannot filter or select on them); full
    /// admins get private keys filled in for the entries returned.
    pub fn query(
        &self,
        role: Role,
        filters_in: Option<&Value>,
        options_in: Option<&Value>,
    ) -> Result<Value, ServiceError> {
        use keyhaven_core::query::{matches, parse_filters, QueryOptions};
        let cached = self.entries()?;
        let can_write = role.can_write();
        let needs_private = can_write
            && (filters_in.is_some_and(|f| f.to_string().contains("private_key"))
                || options_in
                    .and_then(|o| o.get("select"))
                    .is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty())));
        let filters = parse_filters(filters_in.unwrap_or(&Value::Null));
        let options = QueryOptions::from_value(options_in.unwrap_or(&Value::Null));
        // Candidates: the one entry an indexed equality filter names, or the
        // entries that pass the filters, encoded one at a time as the caller
        // sees them (read-only callers filter what they may see, so filters and
        // `select` cannot read redacted attributes). Invalid filters or options
        // fall through to `run_query`, which reports them.
        let seen = |e: &KeychainEntry| -> Result<Value, ServiceError> {
            if needs_private {
                self.view(e, &cached, true)?.to_value()
            } else {
                e.view(can_write).to_value()
            }
        };
        let items: Vec<Value> = match (&filters, &options, pinned_id(&cached, filters_in)) {
            (Ok(f), Ok(o), None) if f.is_empty() && o.count && !needs_private => {
                return Ok(Value::from(cached.len()));
            }
            (Ok(_), Ok(_), Some(id)) => id.and_then(|id| cached.get(id)).map(seen).transpose()?.into_iter().collect(),
            (Ok(f), Ok(_), None) => {
                let mut out = Vec::new();
                for e in cached.iter() {
                    let v = seen(e)?;
                    if matches(&v, f) {
                        out.push(v);
                    }
                }
                out
            }
            _ => vec![],
        };
        let out = super::run_query(&items, filters_in, options_in)?;
        if !can_write || needs_private {
            return Ok(out);
        }
        // Private keys are read for the entries returned only (after limit/offset).
        let filled = |v: Value| -> Result<Value, ServiceError> {
            match v.get("id").and_then(Value::as_i64).and_then(|id| cached.get(id)) {
                Some(e) if e.is_key_pair() => self.view(e, &cached, true)?.to_value(),
                _ => Ok(v),
            }
        };
        match out {
            Value::Array(a) => Ok(Value::Array(a.into_iter().map(filled).collect::<Result<_, _>>()?)),
            v @ Value::Object(_) => filled(v),
            v => Ok(v),
        }
    }

    /// One entry as a caller of `role` may see it.
    pub fn get_as(&self, id: i64, role: Role) -> Result<KeychainEntry, ServiceError> {
        let cached = self.cached()?;
        self.view(cached.get(id).ok_or_else(|| not_found(id))?, &cached, role.can_write())
    }
}

/// The entry a top-level `["name", "=", s]` or `["id", "=", n]` filter pins
/// down, if any: the list is an AND, so no other entry can match.
fn pinned_id(cached: &Cached, filters: Option<&Value>) -> Option<Option<i64>> {
    let list = filters?.as_array()?;
    for f in list {
        let Some([field, op, value]) = f.as_array().map(Vec::as_slice) else { continue };
        if op != "=" {
            continue;
        }
        match (field.as_str(), value) {
            (Some("name"), Value::String(n)) => return Some(cached.names.get(n).copied()),
            (Some("id"), Value::Number(n)) if n.is_i64() => {
                let id = n.as_i64().unwrap_or_default();
                return Some(cached.contains(id).then_some(id));
            }
            _ => {}
        }
    }
    None
}

/// Map `keys::KeyAlgorithm` errors from strings.
pub fn parse_algorithm(s: &str, attr: &str) -> Result<KeyAlgorithm, ServiceError> {
    s.parse::<KeyAlgorithm>().map_err(|_| {
        ServiceError::Validation(
            FieldError::new(attr, "Input should be 'ED25519', 'ECDSA' or 'RSA'").with_errno(EINVAL).into(),
        )
    })
}

// ------------------------------------------------------------ typed entries

/// A keychain credential as TrueNAS shows it (`keychaincredential` entry):
/// a key pair or an SSH connection. Serialised once, at the API edge.
/// Entries in the cache never carry a private key; one is filled in per
/// reader ([`Keychain::get`]). No `Clone`/`Debug`: an entry may hold a secret.
#[derive(Serialize)]
#[serde(untagged)]
pub enum KeychainEntry {
    KeyPair(KeyPairEntry),
    Connection(ConnectionEntry),
}

/// An `SSH_KEY_PAIR` entry: TrueNAS's fields plus keyhaven's additive
/// `key_type`/`bits`/`comment`/`fingerprint`/`algorithm` (null on rows that lack them).
#[derive(Serialize)]
pub struct KeyPairEntry {
    pub id: i64,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub key_type: Option<String>,
    pub bits: Option<u32>,
    pub comment: Option<String>,
    pub fingerprint: Option<String>,
    pub algorithm: Option<String>,
    pub attributes: Shown<KeyPairEntryAttributes>,
}

/// `attributes` of a key pair entry.
#[derive(Serialize, Deserialize)]
pub struct KeyPairEntryAttributes {
    #[serde(default, skip_deserializing, serialize_with = "expose_private")]
    pub private_key: Option<Zeroizing<String>>,
    #[serde(default)]
    pub public_key: String,
}

/// An `SSH_CREDENTIALS` entry (TrueNAS's shape).
#[derive(Serialize)]
pub struct ConnectionEntry {
    pub id: i64,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub attributes: Shown<ConnectionEntryAttributes>,
}

/// `attributes` of a connection entry; `private_key` is the id of the key pair it uses.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ConnectionEntryAttributes {
    #[serde(default)]
    pub host: String,
    #[serde(default = "input::default_port")]
    pub port: i64,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub private_key: i64,
    #[serde(default)]
    pub remote_host_key: String,
    #[serde(default = "input::default_connect_timeout")]
    pub connect_timeout: i64,
}

/// Attributes as a caller may see them: read-only callers get TrueNAS's
/// Secret placeholder instead.
pub enum Shown<T> {
    Full(T),
    Redacted,
}

impl<T: Serialize> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Shown::Full(t) => t.serialize(s),
            Shown::Redacted => s.serialize_str(REDACTED),
        }
    }
}

impl<T> Shown<T> {
    pub fn full(&self) -> Option<&T> {
        match self {
            Shown::Full(t) => Some(t),
            Shown::Redacted => None,
        }
    }
}

fn expose_private<S: serde::Serializer>(k: &Option<Zeroizing<String>>, s: S) -> Result<S::Ok, S::Error> {
    match k {
        Some(k) => s.serialize_str(k.as_str()),
        None => s.serialize_none(),
    }
}

/// Stored key-pair attributes: the additive fields move up to the entry.
#[derive(Deserialize)]
struct StoredKeyPair {
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default)]
    bits: Option<u32>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(flatten)]
    attributes: KeyPairEntryAttributes,
}

impl KeychainEntry {
    /// The entry of a stored record (private key left out). Attributes are
    /// written by this module only; a field that does not decode reads as its default.
    fn from_record(r: &keyhaven_store::KeychainRecord) -> Self {
        if r.kind == SSH_CREDENTIALS {
            KeychainEntry::Connection(ConnectionEntry {
                id: r.id,
                name: r.name.clone(),
                kind: SSH_CREDENTIALS,
                attributes: Shown::Full(ConnectionEntryAttributes::deserialize(&r.attributes).unwrap_or_default()),
            })
        } else {
            let s = StoredKeyPair::deserialize(&r.attributes).unwrap_or(StoredKeyPair {
                key_type: None,
                bits: None,
                comment: None,
                fingerprint: None,
                algorithm: None,
                attributes: KeyPairEntryAttributes { private_key: None, public_key: String::new() },
            });
            KeychainEntry::KeyPair(KeyPairEntry {
                id: r.id,
                name: r.name.clone(),
                kind: SSH_KEY_PAIR,
                key_type: s.key_type,
                bits: s.bits,
                comment: s.comment,
                fingerprint: s.fingerprint,
                algorithm: s.algorithm,
                attributes: Shown::Full(s.attributes),
            })
        }
    }

    pub fn id(&self) -> i64 {
        match self {
            KeychainEntry::KeyPair(k) => k.id,
            KeychainEntry::Connection(c) => c.id,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            KeychainEntry::KeyPair(k) => &k.name,
            KeychainEntry::Connection(c) => &c.name,
        }
    }

    pub fn is_key_pair(&self) -> bool {
        matches!(self, KeychainEntry::KeyPair(_))
    }

    pub fn key_pair(&self) -> Option<&KeyPairEntry> {
        match self {
            KeychainEntry::KeyPair(k) => Some(k),
            KeychainEntry::Connection(_) => None,
        }
    }

    pub fn connection(&self) -> Option<&ConnectionEntry> {
        match self {
            KeychainEntry::Connection(c) => Some(c),
            KeychainEntry::KeyPair(_) => None,
        }
    }

    /// A connection's attributes (None for a key pair or a redacted view).
    pub fn connection_attributes(&self) -> Option<&ConnectionEntryAttributes> {
        self.connection().and_then(|c| c.attributes.full())
    }

    /// A key pair's public key (None for a connection or a redacted view).
    pub fn public_key(&self) -> Option<&str> {
        self.key_pair().and_then(|k| k.attributes.full()).map(|a| a.public_key.as_str())
    }

    /// A copy as a caller sees it: without private key, attributes redacted
    /// unless `full`. (Cache entries never hold a private key.)
    fn view(&self, full: bool) -> KeychainEntry {
        match self {
            KeychainEntry::KeyPair(k) => KeychainEntry::KeyPair(KeyPairEntry {
                id: k.id,
                name: k.name.clone(),
                kind: k.kind,
                key_type: k.key_type.clone(),
                bits: k.bits,
                comment: k.comment.clone(),
                fingerprint: k.fingerprint.clone(),
                algorithm: k.algorithm.clone(),
                attributes: match (&k.attributes, full) {
                    (Shown::Full(a), true) => {
                        Shown::Full(KeyPairEntryAttributes { private_key: None, public_key: a.public_key.clone() })
                    }
                    _ => Shown::Redacted,
                },
            }),
            KeychainEntry::Connection(c) => KeychainEntry::Connection(ConnectionEntry {
                id: c.id,
                name: c.name.clone(),
                kind: c.kind,
                attributes: match (&c.attributes, full) {
                    (Shown::Full(a), true) => Shown::Full(a.clone()),
                    _ => Shown::Redacted,
                },
            }),
        }
    }

    /// The wire form (for the query engine and the API edge).
    pub fn to_value(&self) -> Result<Value, ServiceError> {
        serde_json::to_value(self).map_err(|e| ServiceError::internal("encoding a credential", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pair_input_debug_shows_no_secret() {
        let k = KeyPairInput {
            private_key: Some(SecretText(secrecy::SecretString::from(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn".to_string(),
            ))),
            public_key: Some("ssh-ed25519 AAAA".into()),
            passphrase: Some(Secret(secrecy::SecretString::from("hunter2".to_string()))),
        };
        let shown = format!("{k:?}");
        assert!(!shown.contains("BEGIN") && !shown.contains("b3Blbn") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("ssh-ed25519"), "{shown}");
    }

    fn record(id: i64, kind: &str, attributes: Value) -> keyhaven_store::KeychainRecord {
        keyhaven_store::KeychainRecord {
            id,
            name: format!("n{id}"),
            kind: kind.into(),
            attributes,
            has_private_key: true,
        }
    }

    /// The wire form of typed entries is TrueNAS's entry, byte for byte as the
    /// JSON-built entries were: additive key-pair fields at the top, the
    /// private key null until filled, connections' attributes as stored.
    #[test]
    fn entries_serialise_to_the_truenas_shape() {
        let kp = record(
            1,
            SSH_KEY_PAIR,
            serde_json::json!({"private_key": null, "public_key": "ssh-ed25519 AAAA c", "key_type": "ssh-ed25519",
                "algorithm": "ED25519", "bits": 256, "comment": "c", "fingerprint": "SHA256:x"}),
        );
        let e = KeychainEntry::from_record(&kp);
        assert_eq!(
            e.to_value().unwrap(),
            serde_json::from_str::<serde_json::Value>(r#"{"algorithm":"ED25519","attributes":{"private_key":null,"public_key":"ssh-ed25519 AAAA c"},"bits":256,"comment":"c","fingerprint":"SHA256:x","id":1,"key_type":"ssh-ed25519","name":"n1","type":"SSH_KEY_PAIR"}"#).unwrap()
        );
        let mut full = e.view(true);
        if let KeychainEntry::KeyPair(KeyPairEntry { attributes: Shown::Full(a), .. }) = &mut full {
            a.private_key = Some(Zeroizing::new("PRIV".into()));
        }
        assert_eq!(full.to_value().unwrap()["attributes"]["private_key"], "PRIV");
        assert_eq!(e.view(false).to_value().unwrap()["attributes"], REDACTED);
        assert_eq!(e.view(false).to_value().unwrap()["fingerprint"], "SHA256:x");

        // A row written before the additive fields existed reads them as null.
        let old = KeychainEntry::from_record(&record(2, SSH_KEY_PAIR, serde_json::json!({"public_key": "k"})));
        assert_eq!(
            old.to_value().unwrap(),
            serde_json::from_str::<serde_json::Value>(r#"{"algorithm":null,"attributes":{"private_key":null,"public_key":"k"},"bits":null,"comment":null,"fingerprint":null,"id":2,"key_type":null,"name":"n2","type":"SSH_KEY_PAIR"}"#).unwrap()
        );

        let conn = KeychainEntry::from_record(&record(
            3,
            SSH_CREDENTIALS,
            serde_json::json!({"host": "h", "port": 2222, "username": "u", "private_key": 1,
                "remote_host_key": "ssh-ed25519 AAAA", "connect_timeout": 10}),
        ));
        assert_eq!(
            conn.to_value().unwrap(),
            serde_json::from_str::<serde_json::Value>(r#"{"attributes":{"connect_timeout":10,"host":"h","port":2222,"private_key":1,"remote_host_key":"ssh-ed25519 AAAA","username":"u"},"id":3,"name":"n3","type":"SSH_CREDENTIALS"}"#).unwrap()
        );
        assert_eq!(conn.view(false).to_value().unwrap()["attributes"], REDACTED);
        assert_eq!(conn.connection_attributes().map(|a| a.port), Some(2222));
    }
}
