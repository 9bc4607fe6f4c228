// The Backup Credentials screen: SSH key pairs and SSH connections, pairing, re-pairing and key rotation.

import { fmtSeconds, route } from './shell.js';
import { $, btn, busy, card, confirmDialog, download, formModal, h, infoDialog, nextId, openModal, table, toast, toastError } from './dom.js';
import { RpcError, errText, rpc } from './rpc.js';

// ---------------------------------------------------------------- Backup Credentials
export const KEY_SIZES = { ED25519: [['', 'n/a (256 bits)']], ECDSA: [['256', '256'], ['384', '384'], ['521', '521']], RSA: [['2048', '2048'], ['3072', '3072'], ['4096', '4096']] };

export async function viewBackup(view) {
  const [keys, conns, tests] = await Promise.all([
    rpc.call('keychaincredential.query', [['type', '=', 'SSH_KEY_PAIR']]),
    rpc.call('keychaincredential.query', [['type', '=', 'SSH_CREDENTIALS']]),
    rpc.has('keychaincredential.ssh_connection_status') ? rpc.call('keychaincredential.ssh_connection_status') : [],
  ]);
  const lastTest = new Map(tests.map((t) => [t.id, t]));
  const keyName = (id) => (keys.find((k) => k.id === id) || {}).name || (id ? `#${id}` : '');
  const usedBy = (id) => conns.filter((c) => c.attributes && c.attributes.private_key === id).length;
  const reload = () => route();
  const canTest = rpc.has('keychaincredential.test_ssh_connection');

  const connTable = table([
    { label: 'Name', key: 'name' },
    { label: 'Host', render: (c) => c.attributes.host },
    { label: 'Port', render: (c) => c.attributes.port },
    { label: 'User', render: (c) => c.attributes.username },
    { label: 'Key name', render: (c) => keyName(c.attributes.private_key) },
    { label: 'Status', render: (c) => h('span', { id: `status-${c.id}` }, connectionStatus(lastTest.get(c.id))) },
    { label: 'Actions', cls: 'actions', render: (c) => [
      canTest ? btn('Test', () => testConnection(c, reload), 'secondary small', { 'aria-label': `Test ${c.name}` }) : null,
      btn('Edit', () => connectionForm(keys, c, reload), 'secondary small', { 'aria-label': `Edit ${c.name}` }),
      rpc.has('keychaincredential.re_pair_ssh_connection')
        ? btn('Re-pair…', () => rePairForm(c, keys, reload), 'secondary small', { 'aria-label': `Re-pair ${c.name}` }) : null,
      canTest ? btn('Rotate key…', () => rotateKeyForm(c, keys, reload), 'secondary small', { 'aria-label': `Rotate the key of ${c.name}` }) : null,
      btn('Delete', () => deleteConnection(c, keys, conns, reload), 'danger small', { 'aria-label': `Delete ${c.name}` }),
    ] },
  ], conns, 'No SSH connections yet.', (c) => ({ 'data-name': c.name }));

  const keyTable = table([
    { label: 'Name', key: 'name' },
    { label: 'Type', render: (k) => k.algorithm || k.key_type || '' },
    { label: 'Bits', key: 'bits' },
    { label: 'Fingerprint', cls: 'mono', key: 'fingerprint' },
    { label: 'Used by', render: (k) => String(usedBy(k.id)) },
    { label: 'Actions', cls: 'actions', render: (k) => [
      btn('Edit', () => keypairForm(k, reload), 'secondary small', { 'aria-label': `Edit ${k.name}` }),
      k.attributes.public_key ? btn('Public key', () => download(k, 'public_key').catch(toastError), 'secondary small', { 'aria-label': `Download public key of ${k.name}` }) : null,
      k.attributes.private_key !== undefined && k.attributes.private_key !== null
        ? btn('Private key…', () => downloadPrivate(k), 'secondary small', { 'aria-label': `Download private key of ${k.name}` }) : null,
      btn('Delete', () => deleteKeypair(k, reload), 'danger small', { 'aria-label': `Delete ${k.name}` }),
    ] },
  ], keys, 'No SSH key pairs yet.', (k) => ({ 'data-name': k.name }));

  view.replaceChildren(
    h('h1', {}, 'Credentials › Backup Credentials'),
    card('SSH Connections', [
      rpc.has('auth.generate_token') ? btn('Pairing token…', () => pairingToken(), 'secondary', { id: 'pairing-token' }) : null,
      btn('Add', () => connectionForm(keys, null, reload), '', { id: 'add-connection' }),
    ], connTable),
    card('SSH Keypairs', [btn('Add', () => keypairForm(null, reload), '', { id: 'add-keypair' })], keyTable),
  );
}

export function keypairForm(kp, done) {
  const edit = !!kp;
  const mode = (v) => (edit ? (v.replace ? 'paste' : 'none') : v.mode);
  const fields = [
    { name: 'name', label: 'Name', help: 'A unique name for this key pair.' },
    edit ? { name: 'replace', label: 'Replace the keys (the stored private key is never shown)', type: 'checkbox' }
      : { name: 'mode', label: 'Key pair', type: 'select', options: [['generate', 'Generate a new key pair'], ['paste', 'Paste an existing private and/or public key']] },
    { name: 'key_type', label: 'Key type', type: 'select', options: [['ED25519', 'Ed25519 (recommended)'], ['ECDSA', 'ECDSA'], ['RSA', 'RSA']], show: (v) => mode(v) === 'generate' },
    { name: 'size', label: 'Key size (bits)', type: 'select', options: [...KEY_SIZES.RSA, ...KEY_SIZES.ECDSA, ...KEY_SIZES.ED25519], show: (v) => mode(v) === 'generate' && v.key_type !== 'ED25519' },
    { name: 'comment', label: 'Comment (optional)', show: (v) => mode(v) === 'generate' },
    { name: 'private_key', label: 'Private Key', type: 'textarea', rows: 6, show: (v) => mode(v) === 'paste',
      help: 'OpenSSH, PEM or PKCS#8. Leave empty to store a public key only. The public key is derived when omitted.' },
    { name: 'passphrase', label: 'Passphrase (for an encrypted private key)', type: 'password', show: (v) => mode(v) === 'paste',
      help: 'Used once to decrypt the key; keyhaven stores the key encrypted at rest and never stores the passphrase.' },
    { name: 'public_key', label: 'Public Key', type: 'textarea', rows: 3, show: (v) => mode(v) === 'paste' },
  ];
  const intro = h('p', { class: 'note' }, 'Generate a new key pair, or paste a private key, a public key or both. A lone private key gets its public key derived.');
  const { form } = formModal({
    title: edit ? `Edit SSH Keypair ${kp.name}` : 'Add SSH Keypair', intro, fields,
    values: edit ? { name: kp.name, replace: false } : { mode: 'generate', key_type: 'ED25519', size: '3072' },
    aliases: { key_type: 'key_type', size: 'size' },
    onSubmit: async (v, f, m) => {
      const md = mode(v);
      let attributes = null;
      if (md === 'generate') {
        const args = { key_type: v.key_type };
        if (v.key_type !== 'ED25519') args.size = Number(v.size);
        if (v.comment.trim()) args.comment = v.comment.trim();
        const label = `Generating ${v.key_type}${args.size ? `-${args.size}` : ''} key pair…`;
        attributes = await busy(label, () => rpc.call('keychaincredential.generate_ssh_key_pair', args));
      } else if (md === 'paste') {
        attributes = {};
        if (v.private_key.trim()) attributes.private_key = v.private_key.trim() + '\n';
        if (v.public_key.trim()) attributes.public_key = v.public_key.trim();
        if (v.passphrase) attributes.passphrase = v.passphrase;
      }
      await busy('Saving…', async () => {
        if (edit) {
          const patch = { name: v.name };
          if (attributes) patch.attributes = attributes;
          await rpc.call('keychaincredential.update', kp.id, patch);
        } else {
          await rpc.call('keychaincredential.create', { name: v.name, type: 'SSH_KEY_PAIR', attributes });
        }
      });
      m.close();
      toast('SSH Keypair saved');
      done();
    },
  });
  // Keep the size list to the chosen type.
  const syncSizes = () => {
    const t = form.ctl.key_type.value;
    const allowed = KEY_SIZES[t].map(([x]) => x);
    for (const o of form.ctl.size.options) o.hidden = !allowed.includes(o.value);
    if (!allowed.includes(form.ctl.size.value)) form.ctl.size.value = t === 'RSA' ? '3072' : allowed[0];
  };
  form.ctl.key_type.addEventListener('change', syncSizes);
  syncSizes();
}

export async function downloadPrivate(kp) {
  const fields = [
    { name: 'passphrase', label: 'Passphrase to encrypt the downloaded key (optional)', type: 'password' },
    { name: 'passphrase2', label: 'Repeat passphrase', type: 'password' },
  ];
  const intro = h('p', { class: 'warn' }, `You are about to export the private key of “${kp.name}”. Anyone holding this file can log in wherever the key is authorized. The download is recorded in the audit log.`);
  formModal({
    title: 'Download private key', intro, fields, submitLabel: 'Download private key',
    onSubmit: async (v, f, m) => {
      if (v.passphrase !== v.passphrase2) { f.fieldError('passphrase2', 'The passphrases do not match'); return; }
      await busy('Preparing the download…', () => download(kp, 'private_key', v.passphrase || null));
      m.close();
    },
  });
}

export async function deleteKeypair(kp, done) {
  try {
    const used = await busy('Checking what uses this key…', () => rpc.call('keychaincredential.used_by', kp.id));
    const body = used.length
      ? h('div', {}, h('p', {}, `The SSH Keypair “${kp.name}” is used by:`), h('ul', { class: 'plain' }, used.map((u) => h('li', {}, `${u.title} (${String(u.unbind_method).toLowerCase()})`))),
        h('p', { class: 'warn' }, 'Deleting it also deletes these SSH connections.'))
      : h('p', {}, `Delete the SSH Keypair “${kp.name}”?`);
    if (!await confirmDialog('Delete SSH Keypair', body, { confirmLabel: 'Delete', danger: true })) return;
    await busy('Deleting…', () => rpc.call('keychaincredential.delete', kp.id, { cascade: used.length > 0 }));
    toast('SSH Keypair deleted');
    done();
  } catch (e) { toastError(e); }
}

export async function deleteConnection(c, keys, conns, done) {
  try {
    const keyId = c.attributes.private_key;
    const kp = keys.find((k) => k.id === keyId);
    let body = h('p', {}, `Delete the SSH connection “${c.name}”?`);
    let checkbox = null;
    if (kp) {
      const used = await busy('Checking what uses the key pair…', () => rpc.call('keychaincredential.used_by', kp.id));
      const others = used.filter((u) => u.title !== c.name && !String(u.title).includes(`“${c.name}”`));
      checkbox = `Delete associated SSH Keypair “${kp.name}”`;
      body = h('div', {}, body, others.length > 0
        ? h('div', { class: 'warn' }, 'The associated SSH Keypair is also used by:', h('ul', { class: 'plain' }, others.map((u) => h('li', {}, u.title))),
          'If you delete the keypair, all these SSH connections will also be deleted.')
        : null);
    }
    const r = await confirmDialog('Delete SSH Connection', body, { confirmLabel: 'Delete', danger: true, checkbox });
    if (!r) return;
    await busy('Deleting…', async () => {
      if (r.checked && kp) await rpc.call('keychaincredential.delete', kp.id, { cascade: true });
      else await rpc.call('keychaincredential.delete', c.id);
    });
    toast('SSH Connection deleted');
    rememberPairingUrl(c.id, null).catch(() => {});
    done();
  } catch (e) { toastError(e); }
}

// "5 min ago" for an ejson {$date: ms}.
export function ago(d) {
  const s = Math.max(0, Math.round((Date.now() - ((d && d.$date) || 0)) / 1000));
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// The connection's last test, as a badge with when and why.
export function connectionStatus(t) {
  if (!t) return h('span', { class: 'empty' }, 'Not tested');
  const why = t.ok ? `tested ${ago(t.tested_at)}` : `${t.stage}: ${t.error || ''}`;
  return h('span', { class: 'status', title: why },
    h('span', { class: `badge ${t.ok ? 'ok' : 'fail'}` }, t.ok ? 'OK' : `FAILED (${t.stage})`), ' ', h('span', { class: 'help' }, ago(t.tested_at)));
}

export async function testConnection(c, done) {
  let r;
  try {
    r = await busy(`Testing ${c.name}…`, () => rpc.call('keychaincredential.test_ssh_connection', c.id));
  } catch (e) { toastError(e); return; }
  // The list's status column shows this test from now on.
  const cell = $(`status-${c.id}`);
  if (cell) cell.replaceChildren(connectionStatus({ ...r, tested_at: { $date: Date.now() } }));
  const dl = h('dl', { class: 'kv', id: 'test-result' },
    h('dt', {}, 'Result'), h('dd', {}, h('span', { class: `badge ${r.ok ? 'ok' : 'fail'}` }, r.ok ? 'OK' : 'FAILED')),
    h('dt', {}, 'Stage'), h('dd', {}, String(r.stage ?? '')),
    h('dt', {}, 'Latency'), h('dd', {}, r.latency_ms === null || r.latency_ms === undefined ? '' : `${r.latency_ms} ms`),
    // Where the time went: a slow network shows in connect, a slow login on the remote in channel/command.
    r.stages_ms ? [h('dt', {}, 'Stages'), h('dd', { id: 'test-stages' },
      `connect ${r.stages_ms.connect} ms · auth ${r.stages_ms.auth} ms · session ${r.stages_ms.channel} ms · command ${r.stages_ms.command} ms`)] : null,
    r.error ? [h('dt', {}, 'Error'), h('dd', { class: 'error' }, String(r.error))] : null);
  const buttons = [{ label: 'Close', onClick: (m) => m.close() }];
  // A changed host key is not a dead end: review what the remote offers now and re-pin it, or cancel.
  const hostKeyChanged = !r.ok && r.stage === 'host_key' && rpc.has('keychaincredential.remote_ssh_host_key_scan_fingerprints');
  if (hostKeyChanged) {
    buttons.unshift({ label: 'Review the new host keys…', cls: 'secondary', id: 'review-host-keys', onClick: (m) => { m.close(); reviewHostKeys(c, done); } });
  }
  openModal({ title: `Test of ${c.name}`, body: dl, buttons });
}

// `SHA256:…` of an OpenSSH public key line, as ssh-keygen -l prints it (null when
// the browser has no WebCrypto, i.e. outside a secure context).
export async function fingerprintOf(line) {
  const b64 = (line.trim().split(/\s+/)[1] || '');
  if (!window.crypto || !crypto.subtle || !b64) return null;
  try {
    const blob = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', blob));
    return `SHA256:${btoa(String.fromCharCode(...digest)).replace(/=+$/, '')}`;
  } catch (e) { return null; }
}

export async function reviewHostKeys(conn, done) {
  let c; let offered;
  try {
    // The stored entry, not the page's copy: the pinned keys shown must be the ones in force.
    c = await rpc.call('keychaincredential.get_instance', conn.id);
  } catch (e) { toastError(e); return; }
  const a = c.attributes;
  try {
    offered = await busy(`Scanning ${a.host}:${a.port}…`, () => rpc.call('keychaincredential.remote_ssh_host_key_scan_fingerprints',
      { host: a.host, port: a.port, connect_timeout: a.connect_timeout || 10 }));
  } catch (e) { toastError(e); return; }
  const pinned = await Promise.all(String(a.remote_host_key || '').split('\n').filter((l) => l.trim())
    .map(async (l) => ({ type: l.trim().split(/\s+/)[0], fingerprint: await fingerprintOf(l) })));
  const rows = (list, cls) => list.map((k) => h('tr', {}, h('td', {}, k.type), h('td', { class: `mono ${cls}` }, k.fingerprint || '(fingerprint unavailable)')));
  const body = h('div', { id: 'host-key-review' },
    h('p', { class: 'warn' }, `Accept only if you know why ${a.host} has new host keys (reinstalled, keys replaced). Compare the new fingerprints with the ones the remote shows (its System › Services › SSH page, or ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub). Otherwise cancel: someone may be intercepting the connection.`),
    h('h3', {}, 'Pinned now'), h('table', {}, h('tbody', {}, rows(pinned, 'old-key'))),
    h('h3', {}, `Offered now by ${a.host}:${a.port}`), h('table', {}, h('tbody', {}, rows(offered, 'new-key'))));
  const ok = await confirmDialog(`New host keys for ${c.name}`, body, { confirmLabel: 'Accept the new keys', danger: true });
  if (!ok) return;
  const attributes = { ...a, remote_host_key: offered.map((k) => k.public_key).join('\n') };
  try {
    await busy('Saving…', () => rpc.call('keychaincredential.update', c.id, { attributes }));
  } catch (e) { toastError(e); return; }
  toast(`Host keys of ${c.name} updated`);
  if (done) done();
  await testConnection({ ...c, attributes }, done);
}

// The account's attributes (auth.set_attribute / auth.me), one key per
// concern so that different settings never overwrite each other: TrueNAS's
// `preferences` (the session timeout), `keyhaven_tls_pins` (certificates by
// address) and `keyhaven_pairing_urls` (by connection).
export const attribute = (key) => (rpc.user && rpc.user.attributes && rpc.user.attributes[key]) || {};

// Read-modify-write of one attribute (an object), from the server's current
// copy so a change made in another tab is kept.
export async function updateAttribute(key, mutate) {
  const me = await rpc.call('auth.me');
  const attrs = { ...(me.attributes || {}) };
  const value = { ...(attrs[key] || {}) };
  mutate(value);
  attrs[key] = value;
  // Bounded: the server keeps at most 16 KiB of attributes per account. The
  // maps keep insertion order (their keys are never integer-like), oldest first.
  for (const k of ['keyhaven_pairing_urls', 'keyhaven_tls_pins']) {
    while (JSON.stringify(attrs).length > 12 * 1024 && Object.keys(attrs[k] || {}).length) {
      const [oldest] = Object.keys(attrs[k]);
      attrs[k] = { ...attrs[k] };
      delete attrs[k][oldest];
    }
  }
  for (const k of Object.keys(attrs)) {
    if (k === key || JSON.stringify(attrs[k]) !== JSON.stringify((me.attributes || {})[k])) {
      await rpc.call('auth.set_attribute', k, attrs[k]);
    }
  }
  rpc.user.attributes = attrs;
}

// Self-signed certificates the admin checked and trusted when pairing, by
// address: later pairings with that address trust exactly that certificate
// (a changed one is refused and asked about again).
export const urlOrigin = (u) => { try { return new URL(String(u).trim()).origin; } catch (e) { return ''; } };
export const pinnedCert = (url) => attribute('keyhaven_tls_pins')[urlOrigin(url)] || '';
export async function rememberCert(origin, fingerprint) {
  if (!origin || !rpc.has('auth.set_attribute')) return;
  await updateAttribute('keyhaven_tls_pins', (pins) => {
    delete pins[origin];
    if (fingerprint) pins[origin] = fingerprint;
  });
}

// The URL a connection was last paired through.
// Keyed `c<id>`: integer-like keys would lose the insertion order the bound relies on.
export const pairingUrl = (connId) => attribute('keyhaven_pairing_urls')[`c${connId}`] || '';
export async function rememberPairingUrl(connId, url) {
  if (!connId || !rpc.has('auth.set_attribute')) return;
  await updateAttribute('keyhaven_pairing_urls', (urls) => {
    delete urls[`c${connId}`];
    if (url) urls[`c${connId}`] = url;
  });
}

// A single-use token another system's semi-automatic setup logs in with.
export async function pairingToken() {
  // A token minted from this (token) session cannot outlive its lifetime.
  const ttl = Math.min(600, rpc.lifetime || 600);
  let token;
  try {
    token = await busy('Creating a pairing token…', () => rpc.call('auth.generate_token', ttl, { purpose: 'pairing' }, false, true));
  } catch (e) { toastError(e); return; }
  const id = nextId('tok');
  const input = h('input', { id, class: 'mono', readonly: true, value: token, 'aria-describedby': `${id}-help` });
  const copy = btn('Copy', async () => {
    try { await navigator.clipboard.writeText(token); toast('Pairing token copied'); } catch (e) { input.select(); toast('Select the token and copy it (Ctrl+C)'); }
  }, 'secondary small', { id: 'pairing-token-copy' });
  // Over TLS the other system will ask to trust this system's certificate: give the fingerprint to compare.
  let cert = null;
  if (location.protocol === 'https:' && rpc.has('keyhaven.tls_certificate')) {
    const c = await rpc.call('keyhaven.tls_certificate').catch(() => null);
    if (c && c.fingerprint_sha256) {
      cert = h('p', { class: 'help' }, 'If the other system asks whether to trust this system’s certificate, its SHA-256 fingerprint must be ',
        h('span', { class: 'mono', id: 'own-cert-fingerprint' }, c.fingerprint_sha256), '.');
    }
  }
  await infoDialog('Pairing token', h('div', {},
    h('label', { for: id }, 'Token'), input, h('div', { class: 'row-buttons' }, copy), cert,
    h('p', { class: 'help', id: `${id}-help` }, `On the other system, choose New SSH Connection › Semi-automatic › Authentication: Pairing token, with this system's URL (${location.origin}). The token logs in as ${rpc.user.pw_name}, works once, from any address, for ${fmtSeconds(ttl)}; it is not shown again.`)));
}

export const SUDO_HELP = 'Replication as a user other than root runs zfs through sudo on the remote; this adds /usr/sbin/zfs to the account’s passwordless sudo commands. The SSH+NETCAT transport also needs python3 on the remote.';

// The remote-login part of semi-automatic setup (shared by New and Re-pair);
// `on(v)` says whether it applies to the form's current values.
export function semiAuthFields(on) {
  return [
    { name: 'url', label: 'URL', show: on, help: 'The remote system’s address with its scheme, e.g. https://10.0.0.5:8443' },
    { name: 'allow_insecure_http', type: 'checkbox', show: (v) => on(v) && /^http:\/\//i.test((v.url || '').trim()),
      label: 'Send the remote login over plain HTTP anyway (the password or token crosses the network unencrypted; only on a network you trust)' },
    { name: 'trusted_cert', type: 'checkbox', show: (v) => on(v) && !!pinnedCert(v.url),
      label: 'Trust the certificate of this address you checked before (only that one; clear to forget it)' },
    { name: 'auth_method', label: 'Authentication', type: 'select', show: on,
      options: [['PASSWORD', 'Admin username and password'], ['TOKEN', 'Pairing token from the remote system']],
      help: 'A pairing token (Backup Credentials › Pairing token… on another keyhaven, or auth.generate_token on TrueNAS) avoids typing the remote admin password here.' },
    { name: 'admin_username', label: 'Admin Username', show: (v) => on(v) && v.auth_method !== 'TOKEN' },
    { name: 'password', label: 'Admin Password', type: 'password', show: (v) => on(v) && v.auth_method !== 'TOKEN' },
    { name: 'otp_token', label: 'One-Time Password (if necessary)', show: (v) => on(v) && v.auth_method !== 'TOKEN', attrs: { inputmode: 'numeric' } },
    { name: 'token', label: 'Pairing Token', type: 'password', show: (v) => on(v) && v.auth_method === 'TOKEN' },
  ];
}

// `semi_automatic_setup` from the form's values.
export function semiArgs(v) {
  const s = { url: v.url.trim(), username: v.username, connect_timeout: v.connect_timeout, sudo: v.sudo && v.username.trim() !== 'root' };
  if (/^http:\/\//i.test(s.url)) s.allow_insecure_http = !!v.allow_insecure_http;
  if (v.auth_method === 'TOKEN') {
    s.token = v.token.trim();
  } else {
    Object.assign(s, { admin_username: v.admin_username, password: v.password });
    if (v.otp_token.trim()) s.otp_token = v.otp_token.trim();
  }
  return s;
}

export const isCertError = (e) => e instanceof RpcError && (e.errname === 'ESSLCERTVERIFICATIONERROR' || String(e.message).includes('ESSLCERTVERIFICATIONERROR'));

// Run `call()` (which sends `s`) trusting the certificate remembered for the
// address; on a certificate error show its fingerprint, and retry trusting
// exactly that certificate if the admin says so. Errors of the first attempt
// propagate (they belong on the form); the retry runs after the question
// replaced the form, so its errors become a toast.
// Returns {value, retried}, or null when declined or the retry failed.
export async function withCertificateRetry(s, v, call) {
  const origin = urlOrigin(s.url);
  const pin = pinnedCert(s.url);
  if (pin && v.trusted_cert) s.tls_fingerprint = pin;
  if (pin && !v.trusted_cert) await rememberCert(origin, null);
  try {
    return { value: await call(), retried: false };
  } catch (e) {
    if (!isCertError(e)) throw e;
    const m = /server's certificate has SHA-256 fingerprint ([0-9A-F:]{95})/.exec(String(e.message));
    const fp = m ? m[1] : null;
    const body = h('div', {}, h('p', { class: 'error' }, errText(e)),
      fp ? [h('p', {}, `The certificate ${origin} presented has this SHA-256 fingerprint:`),
        h('p', { class: 'mono', id: 'cert-fingerprint' }, fp),
        h('p', {}, 'Compare it with the remote’s certificate before trusting it (on keyhaven: openssl x509 -noout -fingerprint -sha256 -in <data>/tls/cert.pem). keyhaven will then trust exactly this certificate for this address, and ask again if it ever changes.')]
        : h('p', {}, 'Would you like to ignore this error and try again?'));
    const retry = await confirmDialog('Certificate not trusted', body, { confirmLabel: fp ? 'Trust this certificate and retry' : 'Ignore and retry' });
    if (!retry) return null;
    if (fp) s.tls_fingerprint = fp; else s.verify_ssl = false;
    try {
      const value = await call();
      if (fp) await rememberCert(origin, fp).catch(toastError);
      return { value, retried: true };
    } catch (e2) { toastError(e2); return null; }
  }
}

export function connectionForm(keys, conn, done) {
  const edit = !!conn;
  const hasSetup = rpc.has('keychaincredential.setup_ssh_connection');
  const a = edit ? conn.attributes : {};
  const semi = (v) => !edit && hasSetup && v.setup_method === 'SEMI-AUTOMATIC';
  const manual = (v) => !semi(v);
  const keyOpts = keys.map((k) => [String(k.id), `${k.name} (${k.algorithm || k.key_type || ''})`]);
  if (!edit && hasSetup) keyOpts.unshift(['NEW', 'Generate New']);
  const fields = [
    { name: 'name', label: 'Name', help: 'A unique name for this connection.' },
    !edit && hasSetup ? { name: 'setup_method', label: 'Setup Method', type: 'select', options: [['SEMI-AUTOMATIC', 'Semi-automatic (keyhaven / TrueNAS only)'], ['MANUAL', 'Manual']],
      help: 'Semi-automatic logs in to the remote system’s API to install the key and pin its host keys. Manual: you install the public key on the remote yourself.' } : null,
    ...semiAuthFields(semi),
    { name: 'host', label: 'Host', show: manual },
    { name: 'port', label: 'Port', type: 'number', show: manual, attrs: { min: 1, max: 65535 } },
    { name: 'username', label: 'Username', help: 'The remote account the SSH session logs in as.' },
    { name: 'sudo', label: 'Enable passwordless sudo for zfs commands', type: 'checkbox', show: (v) => semi(v) && v.username.trim() !== 'root', help: SUDO_HELP },
    { name: 'private_key', label: 'Private Key', type: 'select', options: keyOpts },
    { name: 'new_key_type', label: 'Key type for the new key pair', type: 'select', options: [['ED25519', 'Ed25519'], ['ECDSA', 'ECDSA'], ['RSA', 'RSA']], show: (v) => v.private_key === 'NEW' },
    { name: 'remote_host_key', label: 'Remote Host Key', type: 'textarea', rows: 4, show: manual,
      help: 'The remote’s host public keys (known_hosts lines without the host name). Use Discover Remote Host Key to fetch them and compare fingerprints.' },
    { name: 'connect_timeout', label: 'Connect Timeout (seconds)', type: 'number', attrs: { min: 1, max: 300 } },
  ].filter(Boolean);
  const values = edit
    ? { name: conn.name, host: a.host, port: a.port, username: a.username, private_key: String(a.private_key), remote_host_key: a.remote_host_key, connect_timeout: a.connect_timeout }
    : { setup_method: hasSetup ? 'SEMI-AUTOMATIC' : 'MANUAL', auth_method: 'PASSWORD', trusted_cert: true, admin_username: 'admin', username: 'root', port: 22, connect_timeout: 10, private_key: keyOpts.length ? keyOpts[0][0] : '', new_key_type: 'ED25519' };
  const aliases = { connection_name: 'name', existing_key_id: 'private_key', generate_key: 'private_key', key_type: 'new_key_type' };

  const manualAttrs = (v, keyId) => ({ host: v.host.trim(), port: v.port, username: v.username, private_key: keyId,
    remote_host_key: v.remote_host_key, connect_timeout: v.connect_timeout });
  const saved = (m) => { m.close(); toast('SSH Connection saved'); done(); };

  const submit = async (v, f, m) => {
    const keyChoice = v.private_key === 'NEW'
      ? { generate_key: true, name: `${v.name} Key`, key_type: v.new_key_type }
      : { generate_key: false, existing_key_id: Number(v.private_key) };
    if (edit) {
      await busy('Saving…', () => rpc.call('keychaincredential.update', conn.id, { name: v.name, attributes: manualAttrs(v, Number(v.private_key)) }));
    } else if (semi(v)) {
      const s = semiArgs(v);
      const r = await withCertificateRetry(s, v, () => busy('Pairing with the remote system…', () => rpc.call('keychaincredential.setup_ssh_connection', {
        connection_name: v.name, setup_type: 'SEMI-AUTOMATIC', private_key: keyChoice, semi_automatic_setup: s })));
      if (!r) return;
      await rememberPairingUrl(r.value && r.value.id, s.url).catch(toastError);
      if (r.retried) { toast('SSH Connection saved'); done(); return; }
    } else if (v.private_key !== 'NEW') {
      await busy('Saving…', () => rpc.call('keychaincredential.create', { name: v.name, type: 'SSH_CREDENTIALS', attributes: manualAttrs(v, Number(v.private_key)) }));
    } else if (hasSetup) {
      await busy('Creating the connection…', () => rpc.call('keychaincredential.setup_ssh_connection', {
        connection_name: v.name, setup_type: 'MANUAL', private_key: keyChoice, manual_setup: manualAttrs(v, undefined) }));
    } else {
      const kp = await busy('Generating a key pair…', () => rpc.call('keychaincredential.generate_ssh_key_pair', { key_type: v.new_key_type }));
      const created = await rpc.call('keychaincredential.create', { name: `${v.name} Key`, type: 'SSH_KEY_PAIR', attributes: kp });
      await rpc.call('keychaincredential.create', { name: v.name, type: 'SSH_CREDENTIALS', attributes: manualAttrs(v, created.id) });
    }
    saved(m);
  };

  const { form } = formModal({
    title: edit ? `Edit SSH Connection ${conn.name}` : 'New SSH Connection', fields, values, aliases, onSubmit: submit,
  });
  const scanMethod = rpc.has('keychaincredential.remote_ssh_host_key_scan_fingerprints') ? 'fp'
    : rpc.has('keychaincredential.remote_ssh_host_key_scan') ? 'plain' : null;
  if (scanMethod) {
    const b = btn('Discover Remote Host Key', () => discover(form, scanMethod), 'secondary small', { id: 'discover' });
    form.ctl.remote_host_key.parentElement.append(h('div', { class: 'row-buttons' }, b));
  }
}

// Pair an existing connection again: new host keys, the key installed again,
// and optionally a new key pair (rotation) with the old key taken off the remote.
export function rePairForm(conn, keys, done) {
  const a = conn.attributes;
  const oldKey = keys.find((k) => k.id === a.private_key);
  const taken = new Set(keys.map((k) => k.name));
  let n = 2;
  while (taken.has(`${conn.name} Key ${n}`)) n++;
  const always = () => true;
  const fields = [
    ...semiAuthFields(always),
    { name: 'username', label: 'Username', help: 'The remote account the SSH session logs in as.' },
    { name: 'sudo', label: 'Enable passwordless sudo for zfs commands', type: 'checkbox', show: (v) => v.username.trim() !== 'root', help: SUDO_HELP },
    { name: 'rotate', label: 'Rotate the key: generate a new key pair for this connection', type: 'checkbox',
      help: oldKey ? `Now: ${oldKey.name} (${oldKey.algorithm || oldKey.key_type || ''}, ${oldKey.fingerprint || ''}).` : null },
    { name: 'new_key_name', label: 'Name of the new key pair', show: (v) => v.rotate },
    { name: 'new_key_type', label: 'Key type', type: 'select', options: [['ED25519', 'Ed25519'], ['ECDSA', 'ECDSA'], ['RSA', 'RSA']], show: (v) => v.rotate },
    { name: 'remove_old_key', label: 'Remove the old key from the remote account once the new one works', type: 'checkbox', show: (v) => v.rotate },
    { name: 'connect_timeout', label: 'Connect Timeout (seconds)', type: 'number', attrs: { min: 1, max: 300 } },
  ];
  const values = { url: pairingUrl(conn.id), trusted_cert: true, auth_method: 'PASSWORD', admin_username: 'admin', username: a.username,
    rotate: true, new_key_name: `${conn.name} Key ${n}`, new_key_type: 'ED25519', remove_old_key: true, connect_timeout: a.connect_timeout || 10 };
  const aliases = { name: 'new_key_name', key_type: 'new_key_type' };
  formModal({
    title: `Re-pair SSH Connection ${conn.name}`,
    intro: h('p', { class: 'help' }, 'Logs in to the remote system’s API again to install the key and pin its current host keys. With a new key pair, the connection switches to it only after it logged in.'),
    fields, values, aliases, submitLabel: 'Re-pair',
    onSubmit: async (v, f, m) => {
      const s = semiArgs(v);
      const args = { semi_automatic_setup: s, remove_old_key: !!v.remove_old_key };
      if (v.rotate) args.new_key = { name: v.new_key_name.trim(), key_type: v.new_key_type };
      const r = await withCertificateRetry(s, v, () => busy(v.rotate ? 'Re-pairing with a new key…' : 'Re-pairing…',
        () => rpc.call('keychaincredential.re_pair_ssh_connection', conn.id, args)));
      if (!r) return;
      if (!r.retried) m.close();
      await rememberPairingUrl(conn.id, s.url).catch(toastError);
      const out = r.value;
      const oldName = oldKey ? oldKey.name : `#${out.old_key_pair}`;
      let msg = `${conn.name} re-paired`;
      if (out.old_key_pair) {
        msg += `; it now uses ${v.new_key_name.trim()}`;
        if (out.old_key_removed_from_remote) msg += `, and ${oldName} was removed from the remote account`;
        else if (out.old_key_kept_because) msg += `; ${oldName} stays on the remote: ${out.old_key_kept_because}`;
      }
      toast(msg);
      done();
      // Deleting the old pair is offered only once its key left the remote:
      // otherwise it is the record of which key to take off there.
      if (out.old_key_pair && out.old_key_removed_from_remote) {
        const users = await rpc.call('keychaincredential.used_by', out.old_key_pair).catch(() => null);
        if (users && users.length === 0) {
          const del = await confirmDialog('Delete the old key pair?', h('p', {}, `No connection uses ${oldName} anymore. Delete it?`),
            { confirmLabel: 'Delete', danger: true });
          if (del) {
            try { await rpc.call('keychaincredential.delete', out.old_key_pair); toast(`${oldName} deleted`); done(); } catch (e) { toastError(e); }
          }
        }
      }
    },
  });
}

// Key rotation for any SSH remote (Re-pair… does it all for keyhaven and
// TrueNAS): a new key pair, its public key to install by hand, a test with it,
// and only then the switch.
export function rotateKeyForm(conn, keys, done) {
  const a = conn.attributes;
  const oldKey = keys.find((k) => k.id === a.private_key);
  const taken = new Set(keys.map((k) => k.name));
  let n = 2;
  while (taken.has(`${conn.name} Key ${n}`)) n++;
  formModal({
    title: `Rotate the key of ${conn.name}`,
    intro: h('p', { class: 'help' }, `Generates a new key pair for ${a.username}@${a.host}. You install its public key on the remote, keyhaven logs in with it, and only then the connection switches to it. For a keyhaven or TrueNAS remote, Re-pair… does all of this for you.`),
    fields: [
      { name: 'new_key_name', label: 'Name of the new key pair' },
      { name: 'new_key_type', label: 'Key type', type: 'select', options: [['ED25519', 'Ed25519'], ['ECDSA', 'ECDSA'], ['RSA', 'RSA']] },
    ],
    values: { new_key_name: `${conn.name} Key ${n}`, new_key_type: 'ED25519' },
    aliases: { name: 'new_key_name', key_type: 'new_key_type' },
    submitLabel: 'Generate',
    onSubmit: async (v, f, m) => {
      const kp = await busy('Generating a key pair…', () => rpc.call('keychaincredential.generate_ssh_key_pair', { key_type: v.new_key_type }));
      const created = await rpc.call('keychaincredential.create', { name: v.new_key_name.trim(), type: 'SSH_KEY_PAIR', attributes: kp });
      m.close();
      done();
      rotateInstallStep(conn, oldKey, created, done);
    },
  });
}

export function rotateInstallStep(conn, oldKey, created, done) {
  const a = conn.attributes;
  const pub = String(created.attributes.public_key || '').trim();
  const pubId = nextId('pub');
  const area = h('textarea', { id: pubId, class: 'mono', readonly: true, rows: 3 });
  area.value = pub;
  const result = h('div', { id: 'rotate-test-result', role: 'status' });
  let switchBtn = null;
  let testSeq = 0;
  let switched = false;
  // Switch is offered only while the newest test of the new key succeeded.
  const test = async () => {
    const seq = ++testSeq;
    switchBtn.disabled = true;
    result.replaceChildren(h('p', { class: 'empty' }, 'Testing…'));
    try {
      const r = await rpc.call('keychaincredential.test_ssh_connection', conn.id, { private_key: created.id });
      if (seq !== testSeq) return;
      result.replaceChildren(h('p', {}, h('span', { class: `badge ${r.ok ? 'ok' : 'fail'}` }, r.ok ? 'OK' : 'FAILED'), ' ',
        r.ok ? `${created.name} logs in to ${a.username}@${a.host}.` : `Stage ${r.stage}: ${r.error || ''}`));
      switchBtn.disabled = !r.ok;
    } catch (e) {
      if (seq === testSeq) result.replaceChildren(h('p', { class: 'error' }, errText(e)));
    }
  };
  // Closing without switching (Cancel or Escape) asks about the unused new key pair.
  const abandoned = async () => {
    const del = await confirmDialog('Keep the new key pair?', h('p', {}, `The connection still uses ${oldKey ? oldKey.name : 'its key pair'}. Delete the unused new key pair ${created.name}?`),
      { confirmLabel: 'Delete it', danger: true });
    if (del) { try { await rpc.call('keychaincredential.delete', created.id); done(); } catch (e) { toastError(e); } }
  };
  openModal({
    title: `Install the new key of ${conn.name}`,
    body: h('div', {},
      h('label', { for: pubId }, `Add this line to the authorized keys of ${a.username} on ${a.host} (for OpenSSH: ~${a.username}/.ssh/authorized_keys), then test it:`),
      area,
      h('div', { class: 'row-buttons' },
        btn('Copy', () => navigator.clipboard.writeText(pub).then(() => toast('Public key copied'), () => { area.select(); }), 'secondary small'),
        btn('Test the new key', test, 'secondary small', { id: 'rotate-test' })),
      result),
    onClose: () => { if (!switched) abandoned(); },
    buttons: [
      { label: 'Cancel', cls: 'secondary', onClick: (m) => m.close() },
      { label: 'Switch the connection to it', id: 'rotate-switch', onClick: async (m) => {
        try {
          // The stored entry, not the list's copy: keep any change made since.
          await busy('Switching…', async () => {
            const fresh = await rpc.call('keychaincredential.get_instance', conn.id);
            await rpc.call('keychaincredential.update', conn.id, { attributes: { ...fresh.attributes, private_key: created.id } });
          });
        } catch (e) { m.setError(errText(e)); return; }
        switched = true;
        m.close();
        toast(`${conn.name} now uses ${created.name}. Remove the old key from the remote's authorized keys.`);
        done();
        if (oldKey) {
          const users = await rpc.call('keychaincredential.used_by', oldKey.id).catch(() => null);
          if (users && users.length === 0) {
            const del = await confirmDialog('Delete the old key pair?', h('p', {}, `No connection uses ${oldKey.name} anymore. Delete it once you removed its key from the remote (keep it until then: it tells you which key to remove).`),
              { confirmLabel: 'Delete', danger: true });
            if (del) { try { await rpc.call('keychaincredential.delete', oldKey.id); toast(`${oldKey.name} deleted`); done(); } catch (e) { toastError(e); } }
          }
        }
      } },
    ],
  });
  switchBtn = $('rotate-switch');
  switchBtn.disabled = true;
}

export async function discover(form, scanMethod) {
  const v = form.values();
  form.clearErrors();
  if (!v.host.trim()) { form.fieldError('host', 'Enter the host first'); form.ctl.host.focus(); return; }
  const args = { host: v.host.trim(), port: v.port || 22, connect_timeout: v.connect_timeout || 10 };
  try {
    if (scanMethod === 'plain') {
      const s = await busy(`Scanning ${args.host}…`, () => rpc.call('keychaincredential.remote_ssh_host_key_scan', args));
      form.set('remote_host_key', s);
      return;
    }
    const keys = await busy(`Scanning ${args.host}:${args.port}…`, () => rpc.call('keychaincredential.remote_ssh_host_key_scan_fingerprints', args));
    const formBody = $('modal').querySelector('.modal-body');
    // Show the fingerprints in place (the form stays in the dialog underneath).
    const panel = h('div', { class: 'note', id: 'discover-result', role: 'region', 'aria-label': 'Discovered host keys' },
      h('p', {}, `Host keys offered by ${args.host}:${args.port}. Compare these fingerprints with the ones on the remote system (e.g. ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) before trusting them.`),
      h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Type'), h('th', {}, 'Fingerprint'))),
        h('tbody', {}, keys.map((k) => h('tr', {}, h('td', {}, k.type), h('td', { class: 'mono' }, k.fingerprint))))),
      h('div', { class: 'row-buttons' },
        btn('Trust these keys', () => { form.set('remote_host_key', keys.map((k) => k.public_key).join('\n')); panel.remove(); form.ctl.remote_host_key.focus(); }, '', { id: 'discover-confirm' }),
        btn('Cancel', () => panel.remove())));
    const old = formBody.querySelector('#discover-result');
    if (old) old.remove();
    form.ctl.remote_host_key.parentElement.append(panel);
    panel.querySelector('#discover-confirm').focus();
  } catch (e) {
    const rest = form.showError(e, { host: 'host', port: 'port' });
    if (rest) form.fieldError('remote_host_key', rest);
  }
}
