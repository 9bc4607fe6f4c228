// keyhaven web UI: a plain client of the JSON-RPC 2.0 API at /api/current.
// No framework, no inline script/style (strict CSP); the session lives only in
// this page's memory (the authenticated WebSocket) and ends on logout, on page
// unload, when the server closes the socket, and when the session token expires
// (the account's session timeout without activity).
'use strict';

// ---------------------------------------------------------------- DOM helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);
let uid = 0;
const nextId = (p) => `${p}-${++uid}`;

// ---------------------------------------------------------------- RPC client
class RpcError extends Error {
  constructor(err) {
    const d = err.data || {};
    super(d.reason || err.message || 'Error');
    this.code = err.code;
    this.data = d;
    this.errname = d.errname || '';
    this.extra = Array.isArray(d.extra) ? d.extra : [];
  }
}

const rpc = {
  ws: null, seq: 0, pending: new Map(), methods: null, user: null,
  // Session lifetime in seconds (the token's ttl) and when the server last saw a call from us.
  lifetime: 0, lastCall: 0,
  connect() {
    return new Promise((resolve, reject) => {
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(`${proto}//${location.host}/api/current`);
      ws.onopen = () => { this.ws = ws; resolve(); };
      ws.onerror = () => reject(new Error('Cannot connect to the keyhaven API'));
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { toastError(`Bad message from server: ${e}`); return; }
        const p = this.pending.get(msg.id);
        if (!p) return;
        this.pending.delete(msg.id);
        // The server counts a finished call as activity too.
        this.lastCall = Date.now();
        if (msg.error) p.reject(new RpcError(msg.error)); else p.resolve(msg.result);
      };
      ws.onclose = () => {
        const wasOpen = this.ws === ws;
        if (wasOpen) this.ws = null;
        for (const p of this.pending.values()) p.reject(new Error('Connection to the server closed'));
        this.pending.clear();
        if (wasOpen && this.user) sessionEnded('The connection to keyhaven closed (server restarted or network lost). Please log in again.');
      };
    });
  },
  call(method, ...params) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error('Not connected'));
    const id = ++this.seq;
    this.lastCall = Date.now();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    }).catch((e) => {
      if (e instanceof RpcError && e.errname === 'ENOTAUTHENTICATED' && this.user) {
        sessionEnded(/Session expired/.test(e.message) ? expiredMessage() : 'Your session has ended. Please log in again.');
      }
      throw e;
    });
  },
  has(method) { return !!(this.methods && Object.prototype.hasOwnProperty.call(this.methods, method)); },
  close() { const ws = this.ws; this.ws = null; this.user = null; if (ws) ws.close(); },
};

function errText(e) {
  if (e instanceof RpcError) {
    const lines = e.extra.length ? e.extra.map(([a, m]) => (a ? `${a}: ${m}` : m)) : [e.message];
    return lines.join('\n');
  }
  return e && e.message ? e.message : String(e);
}

// ---------------------------------------------------------------- feedback
function toast(msg, cls) {
  const t = h('div', { class: `toast ${cls || ''}`, role: cls === 'error' ? 'alert' : 'status' }, msg);
  if (cls === 'error') {
    t.append(h('button', { type: 'button', class: 'small', onclick: () => t.remove() }, 'Dismiss'));
  } else {
    setTimeout(() => t.remove(), 4000);
  }
  const box = $('toasts');
  box.append(t);
  while (box.children.length > 3) box.firstElementChild.remove();
  if (box.showPopover) {
    if (box.matches(':popover-open')) box.hidePopover();
    box.showPopover();
  }
}
const toastError = (e) => toast(typeof e === 'string' ? e : errText(e), 'error');

let busyDepth = 0;
async function busy(text, fn) {
  busyDepth++;
  $('busy-text').textContent = text;
  const b = $('busy');
  if (!b.open) b.showModal();
  try { return await fn(); } finally { if (--busyDepth === 0) b.close(); }
}

// ---------------------------------------------------------------- modal dialogs
function openModal({ title, body, buttons, onClose }) {
  const dlg = $('modal');
  if (dlg.open) dlg.close();
  dlg.replaceChildren();
  const titleId = 'modal-title';
  const err = h('p', { class: 'error', role: 'alert', id: 'modal-error' });
  const foot = h('div', { class: 'modal-foot' });
  dlg.append(h('div', { class: 'modal-body' }, h('h2', { class: 'modal-title', id: titleId }, title), body, err), foot);
  let closed = false;
  const m = {
    el: dlg, err,
    // Emptied on close: a dialog may hold a token or a typed password.
    close(v) { if (closed) return; closed = true; dlg.close(); dlg.replaceChildren(); if (onClose) onClose(v); },
    setError(msg) { err.textContent = msg || ''; },
  };
  for (const b of buttons || []) {
    foot.append(h('button', { type: b.submit ? 'submit' : 'button', class: b.cls || '', id: b.id, form: b.form,
      onclick: b.submit ? undefined : () => b.onClick(m) }, b.label));
  }
  dlg.oncancel = (ev) => { ev.preventDefault(); m.close(undefined); };
  dlg.showModal();
  const first = dlg.querySelector('input:not([type=hidden]):not([disabled]), textarea, select');
  if (first) first.focus();
  return m;
}

function confirmDialog(title, body, { confirmLabel = 'Confirm', danger = false, checkbox = null } = {}) {
  return new Promise((resolve) => {
    const cbId = nextId('cb');
    const cb = checkbox ? h('input', { type: 'checkbox', id: cbId }) : null;
    const content = h('div', {}, body, checkbox ? h('div', { class: 'check-row' }, cb, h('label', { for: cbId, class: 'inline' }, checkbox)) : null);
    openModal({
      title, body: content,
      onClose: (v) => resolve(v),
      buttons: [
        { label: 'Cancel', cls: 'secondary', onClick: (m) => m.close(false) },
        { label: confirmLabel, cls: danger ? 'danger' : '', id: 'confirm-ok', onClick: (m) => m.close(checkbox ? { checked: cb.checked } : true) },
      ],
    });
  }).then((v) => v || false);
}

function infoDialog(title, body) {
  return new Promise((resolve) => {
    openModal({ title, body, onClose: () => resolve(), buttons: [{ label: 'Close', onClick: (m) => m.close() }] });
  });
}

// ---------------------------------------------------------------- forms
// A field: {name, label, type, options, help, show(values), value, rows, attrs, after(ctx)}
function buildForm(fields, values) {
  const formId = nextId('form');
  const form = h('form', { id: formId, novalidate: true });
  const ctl = {}; const wraps = {}; const errs = {};
  for (const f of fields) {
    const id = `${formId}-${f.name}`;
    const v = values && values[f.name] !== undefined ? values[f.name] : f.value;
    let input;
    const describedBy = `${id}-err${f.help ? ` ${id}-help` : ''}`;
    const common = { id, name: f.name, 'aria-describedby': describedBy, ...(f.attrs || {}) };
    if (f.type === 'textarea') input = h('textarea', { ...common, rows: f.rows || 4, spellcheck: 'false' });
    else if (f.type === 'select' || f.type === 'multiselect') {
      input = h('select', { ...common, multiple: f.type === 'multiselect' });
      for (const [ov, ol] of f.options || []) input.append(h('option', { value: ov }, ol));
    } else if (f.type === 'checkbox') input = h('input', { ...common, type: 'checkbox' });
    else input = h('input', { ...common, type: f.type || 'text', autocomplete: f.type === 'password' ? 'new-password' : 'off' });
    if (f.type === 'checkbox') input.checked = !!v;
    else if (f.type === 'multiselect') { for (const o of input.options) o.selected = (v || []).includes(o.value); }
    else if (v !== undefined && v !== null) input.value = v;
    const err = h('div', { class: 'field-error', id: `${id}-err`, 'data-error-for': f.name });
    const help = f.help ? h('p', { class: 'help', id: `${id}-help` }, f.help) : null;
    const wrap = f.type === 'checkbox'
      ? h('div', { class: 'field check-row' }, input, h('label', { for: id, class: 'inline' }, f.label), help, err)
      : h('div', { class: 'field' }, h('label', { for: id }, f.label), input, help, err);
    ctl[f.name] = input; wraps[f.name] = wrap; errs[f.name] = err;
    form.append(wrap);
  }
  const api = {
    el: form, id: formId, ctl, fields,
    values() {
      const out = {};
      for (const f of fields) {
        const c = ctl[f.name];
        if (f.type === 'checkbox') out[f.name] = c.checked;
        else if (f.type === 'multiselect') out[f.name] = [...c.selectedOptions].map((o) => o.value);
        else if (f.type === 'number') out[f.name] = c.value === '' ? null : Number(c.value);
        else out[f.name] = c.value;
      }
      return out;
    },
    set(name, v) { ctl[name].value = v; api.refresh(); },
    refresh() {
      const vals = api.values();
      for (const f of fields) if (f.show) wraps[f.name].hidden = !f.show(vals);
    },
    clearErrors() {
      for (const n of Object.keys(errs)) { errs[n].textContent = ''; ctl[n].classList.remove('invalid'); ctl[n].removeAttribute('aria-invalid'); }
    },
    fieldError(name, msg) {
      if (!errs[name]) return false;
      errs[name].textContent = errs[name].textContent ? `${errs[name].textContent}\n${msg}` : msg;
      ctl[name].classList.add('invalid');
      ctl[name].setAttribute('aria-invalid', 'true');
      return true;
    },
    // Shows a server error: validation entries next to their fields (by the
    // attribute's last path segment, or through `aliases`), the rest returned.
    showError(e, aliases) {
      api.clearErrors();
      const rest = [];
      if (e instanceof RpcError && e.extra.length) {
        let firstBad = null;
        for (const [attr, msg] of e.extra) {
          const seg = String(attr || '').split('.').pop();
          const name = (aliases && aliases[seg]) || seg;
          if (wraps[name] && !wraps[name].hidden && api.fieldError(name, msg)) { firstBad = firstBad || name; } else rest.push(attr ? `${attr}: ${msg}` : msg);
        }
        if (firstBad) ctl[firstBad].focus();
      } else rest.push(errText(e));
      return rest.join('\n');
    },
  };
  form.addEventListener('input', () => api.refresh());
  form.addEventListener('change', () => api.refresh());
  api.refresh();
  return api;
}

// A form in a modal. onSubmit(values, form, modal) may throw; errors land on fields.
function formModal({ title, intro, fields, values, submitLabel = 'Save', onSubmit, aliases, extra }) {
  const f = buildForm(fields, values);
  const body = h('div', {}, intro || null, f.el);
  let m;
  const submit = async (ev) => {
    if (ev) ev.preventDefault();
    m.setError('');
    f.clearErrors();
    const btns = m.el.querySelectorAll('.modal-foot button');
    btns.forEach((b) => { b.disabled = true; });
    try {
      await onSubmit(f.values(), f, m);
    } catch (e) {
      m.setError(f.showError(e, aliases));
    } finally {
      btns.forEach((b) => { b.disabled = false; });
    }
  };
  f.el.addEventListener('submit', submit);
  m = openModal({
    title, body,
    buttons: [
      { label: 'Cancel', cls: 'secondary', onClick: (mm) => mm.close() },
      { label: submitLabel, id: 'form-submit', submit: true, form: f.id },
    ],
  });
  if (extra) extra(f, m);
  return { form: f, modal: m };
}

// ---------------------------------------------------------------- downloads
function filenameFrom(resp, fallback) {
  const cd = resp.headers.get('Content-Disposition') || '';
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  return m ? decodeURIComponent(m[1]) : fallback;
}

async function download(kp, which, passphrase) {
  const token = await rpc.call('auth.generate_token', 60, {}, true, true);
  const url = `/_download/keychaincredential/${kp.id}/${which}?auth_token=${encodeURIComponent(token)}`;
  const init = passphrase
    ? { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ passphrase }) }
    : { method: 'GET' };
  const resp = await fetch(url, { ...init, credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer' });
  if (!resp.ok) throw new Error(`Download failed (${resp.status}): ${(await resp.text()).trim()}`);
  const blob = await resp.blob();
  saveBlob(blob, filenameFrom(resp, `${kp.name}_${which}`));
}

function saveBlob(blob, name) {
  const a = h('a', { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// ---------------------------------------------------------------- tables
function table(columns, rows, emptyText, rowAttrs) {
  const t = h('table', {}, h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.label)))));
  const tb = h('tbody');
  if (!rows.length) tb.append(h('tr', {}, h('td', { colspan: columns.length, class: 'empty' }, emptyText)));
  for (const r of rows) {
    tb.append(h('tr', rowAttrs ? rowAttrs(r) : {}, columns.map((c) => {
      const v = c.render ? c.render(r) : r[c.key];
      return h('td', { class: c.cls || '' }, v === null || v === undefined ? '' : v);
    })));
  }
  t.append(tb);
  return t;
}

function card(title, headButtons, content) {
  return h('section', { class: 'card', 'aria-label': title },
    h('div', { class: 'card-head' }, h('h2', {}, title), h('div', { class: 'row-buttons' }, headButtons)), content);
}

const btn = (label, onClick, cls, attrs) => h('button', { type: 'button', class: cls || 'secondary small', onclick: onClick, ...(attrs || {}) }, label);

// ---------------------------------------------------------------- Backup Credentials
const KEY_SIZES = { ED25519: [['', 'n/a (256 bits)']], ECDSA: [['256', '256'], ['384', '384'], ['521', '521']], RSA: [['2048', '2048'], ['3072', '3072'], ['4096', '4096']] };

async function viewBackup(view) {
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

function keypairForm(kp, done) {
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

async function downloadPrivate(kp) {
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

async function deleteKeypair(kp, done) {
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

async function deleteConnection(c, keys, conns, done) {
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
function ago(d) {
  const s = Math.max(0, Math.round((Date.now() - ((d && d.$date) || 0)) / 1000));
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// The connection's last test, as a badge with when and why.
function connectionStatus(t) {
  if (!t) return h('span', { class: 'empty' }, 'Not tested');
  const why = t.ok ? `tested ${ago(t.tested_at)}` : `${t.stage}: ${t.error || ''}`;
  return h('span', { class: 'status', title: why },
    h('span', { class: `badge ${t.ok ? 'ok' : 'fail'}` }, t.ok ? 'OK' : `FAILED (${t.stage})`), ' ', h('span', { class: 'help' }, ago(t.tested_at)));
}

async function testConnection(c, done) {
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
async function fingerprintOf(line) {
  const b64 = (line.trim().split(/\s+/)[1] || '');
  if (!window.crypto || !crypto.subtle || !b64) return null;
  try {
    const blob = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', blob));
    return `SHA256:${btoa(String.fromCharCode(...digest)).replace(/=+$/, '')}`;
  } catch (e) { return null; }
}

async function reviewHostKeys(conn, done) {
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
const attribute = (key) => (rpc.user && rpc.user.attributes && rpc.user.attributes[key]) || {};

// Read-modify-write of one attribute (an object), from the server's current
// copy so a change made in another tab is kept.
async function updateAttribute(key, mutate) {
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
const urlOrigin = (u) => { try { return new URL(String(u).trim()).origin; } catch (e) { return ''; } };
const pinnedCert = (url) => attribute('keyhaven_tls_pins')[urlOrigin(url)] || '';
async function rememberCert(origin, fingerprint) {
  if (!origin || !rpc.has('auth.set_attribute')) return;
  await updateAttribute('keyhaven_tls_pins', (pins) => {
    delete pins[origin];
    if (fingerprint) pins[origin] = fingerprint;
  });
}

// The URL a connection was last paired through.
// Keyed `c<id>`: integer-like keys would lose the insertion order the bound relies on.
const pairingUrl = (connId) => attribute('keyhaven_pairing_urls')[`c${connId}`] || '';
async function rememberPairingUrl(connId, url) {
  if (!connId || !rpc.has('auth.set_attribute')) return;
  await updateAttribute('keyhaven_pairing_urls', (urls) => {
    delete urls[`c${connId}`];
    if (url) urls[`c${connId}`] = url;
  });
}

// A single-use token another system's semi-automatic setup logs in with.
async function pairingToken() {
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

const SUDO_HELP = 'Replication as a user other than root runs zfs through sudo on the remote; this adds /usr/sbin/zfs to the account’s passwordless sudo commands. The SSH+NETCAT transport also needs python3 on the remote.';

// The remote-login part of semi-automatic setup (shared by New and Re-pair);
// `on(v)` says whether it applies to the form's current values.
function semiAuthFields(on) {
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
function semiArgs(v) {
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

const isCertError = (e) => e instanceof RpcError && (e.errname === 'ESSLCERTVERIFICATIONERROR' || String(e.message).includes('ESSLCERTVERIFICATIONERROR'));

// Run `call()` (which sends `s`) trusting the certificate remembered for the
// address; on a certificate error show its fingerprint, and retry trusting
// exactly that certificate if the admin says so. Errors of the first attempt
// propagate (they belong on the form); the retry runs after the question
// replaced the form, so its errors become a toast.
// Returns {value, retried}, or null when declined or the retry failed.
async function withCertificateRetry(s, v, call) {
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

function connectionForm(keys, conn, done) {
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
function rePairForm(conn, keys, done) {
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
function rotateKeyForm(conn, keys, done) {
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

function rotateInstallStep(conn, oldKey, created, done) {
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

async function discover(form, scanMethod) {
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

// ---------------------------------------------------------------- Users
async function viewUsers(view) {
  const users = await rpc.call('user.query');
  const keyCount = (u) => (u.sshpubkey || '').split('\n').filter((l) => l.trim() && !l.trim().startsWith('#')).length;
  view.replaceChildren(
    h('h1', {}, 'Credentials › Users'),
    card('Users', [], table([
      { label: 'Username', key: 'username' },
      { label: 'Full name', key: 'full_name' },
      { label: 'UID', key: 'uid' },
      { label: 'Shell', key: 'shell' },
      { label: 'OS account', render: (u) => osAccountBadge(u) },
      { label: 'Authorized keys', render: (u) => String(keyCount(u)) },
      { label: 'SSH password', render: (u) => (u.ssh_password_enabled ? 'yes' : 'no') },
      { label: '2FA', render: (u) => (u.twofactor_auth_configured ? 'yes' : 'no') },
      { label: 'Actions', cls: 'actions', render: (u) => btn('Edit', () => userForm(u), 'secondary small', { 'aria-label': `Edit ${u.username}` }) },
    ], users, 'No users.', (u) => ({ 'data-name': u.username }))),
  );
}

// How the account's OS counterpart stands (keyhaven's os_account extension).
function osAccountBadge(u) {
  const st = (u.os_account && u.os_account.state) || 'OK';
  if (st === 'OK') return h('span', { class: 'badge ok' }, 'ok');
  const label = st === 'MISSING' ? 'missing' : 'uid changed';
  return h('span', { class: 'badge fail', title: u.os_account.message || '', 'data-os-state': st }, label);
}

function userForm(u) {
  const fields = [
    { name: 'full_name', label: 'Full Name' },
    { name: 'shell', label: 'Shell' },
    { name: 'sshpubkey', label: 'Authorized Keys', type: 'textarea', rows: 6,
      help: 'Public SSH keys, one per line (e.g. the contents of ~/.ssh/id_ed25519.pub). Do not paste a private key.' },
    { name: 'ssh_password_enabled', label: 'SSH password login enabled', type: 'checkbox' },
    { name: 'password', label: 'New password (leave empty to keep)', type: 'password' },
    { name: 'password2', label: 'Repeat new password', type: 'password' },
  ];
  const { form } = formModal({
    title: `Edit User ${u.username}`, fields,
    values: { full_name: u.full_name, shell: u.shell, sshpubkey: u.sshpubkey || '', ssh_password_enabled: u.ssh_password_enabled },
    onSubmit: async (v, f, m) => {
      if (v.password !== v.password2) { f.fieldError('password2', 'The passwords do not match'); return; }
      const patch = { full_name: v.full_name, ssh_password_enabled: v.ssh_password_enabled };
      // The shell may belong to the OS (accounts.manage_os off): send it only when changed.
      if (v.shell !== u.shell) patch.shell = v.shell;
      const keys = v.sshpubkey.trim();
      patch.sshpubkey = keys ? keys : null;
      if (v.password) patch.password = v.password;
      await busy('Saving…', () => rpc.call('user.update', u.id, patch));
      m.close();
      toast('User saved');
      route();
    },
  });
  const fileId = nextId('upload');
  const file = h('input', { type: 'file', id: fileId, accept: '.pub,text/plain' });
  file.addEventListener('change', async () => {
    const fl = file.files && file.files[0];
    if (!fl) return;
    try { form.set('sshpubkey', (await fl.text()).trim()); } catch (e) { toastError(e); }
  });
  const dl = btn('Download Authorized Keys', () => {
    const text = form.ctl.sshpubkey.value.trim();
    saveBlob(new Blob([text ? `${text}\n` : ''], { type: 'text/plain' }), `${u.username}_authorized_keys`);
  }, 'secondary small', { id: 'download-authorized-keys' });
  form.ctl.sshpubkey.parentElement.append(h('div', { class: 'row-buttons' },
    h('label', { for: fileId, class: 'inline' }, 'Upload SSH Key (replaces the text):'), file, dl));
  if (u.os_account && u.os_account.message) {
    form.el.prepend(h('p', { class: 'notice error', role: 'alert', id: 'os-account-problem' }, u.os_account.message));
  }
  if (rpc.user && rpc.user.pw_name === u.username && rpc.has('user.renew_2fa_secret')) {
    form.el.append(h('fieldset', {}, h('legend', {}, 'Two-factor authentication'),
      h('p', { class: 'help' }, u.twofactor_auth_configured ? '2FA is configured. Renewing replaces the secret.' : '2FA is not configured.'),
      btn(u.twofactor_auth_configured ? 'Renew 2FA secret' : 'Configure 2FA', () => enroll2fa(u), 'secondary small')));
  }
}

async function enroll2fa(u) {
  if (!await confirmDialog('Two-factor authentication', h('p', {}, `Create a new one-time-password secret for ${u.username}? The old one stops working.`))) return;
  try {
    const r = await busy('Creating the secret…', () => rpc.call('user.renew_2fa_secret', u.username, {}));
    const uri = r.provisioning_uri || (r.twofactor_config && r.twofactor_config.provisioning_uri) || JSON.stringify(r);
    await infoDialog('Add this account to your authenticator app', h('div', {},
      h('p', {}, 'Enter this URI (or its secret) in your authenticator app. It is shown only once.'),
      h('p', { class: 'mono', id: 'provisioning-uri' }, uri)));
    route();
  } catch (e) { toastError(e); }
}

// ---------------------------------------------------------------- SSH service
const SFTP_LEVELS = ['', 'QUIET', 'FATAL', 'ERROR', 'INFO', 'VERBOSE', 'DEBUG', 'DEBUG2', 'DEBUG3'];
const SFTP_FACILITIES = ['', 'DAEMON', 'USER', 'AUTH', 'LOCAL0', 'LOCAL1', 'LOCAL2', 'LOCAL3', 'LOCAL4', 'LOCAL5', 'LOCAL6', 'LOCAL7'];

async function viewSsh(view) {
  const [cfg, svcs, ifaces] = await Promise.all([
    rpc.call('ssh.config'),
    rpc.call('service.query', [['service', '=', 'ssh']]),
    rpc.has('ssh.bindiface_choices') ? rpc.call('ssh.bindiface_choices') : Promise.resolve({}),
  ]);
  const svc = svcs[0] || { state: 'UNKNOWN', enable: false };
  const ifaceOpts = Object.entries(ifaces).map(([k, v]) => [k, v]);
  for (const b of cfg.bindiface || []) if (!ifaces[b]) ifaceOpts.push([b, b]);

  const control = async (verb) => {
    try {
      await busy(`${verb[0]}${verb.slice(1).toLowerCase()}ing SSH…`, async () => {
        const jobId = await rpc.call('service.control', verb, 'ssh');
        const job = await waitJob(jobId);
        if (job.state !== 'SUCCESS') throw new Error(job.error || `${verb} ssh: ${job.state}`);
      });
      toast(`SSH service: ${verb.toLowerCase()} done`);
    } catch (e) { toastError(e); }
    route();
  };
  const autoId = nextId('auto');
  const auto = h('input', { type: 'checkbox', id: autoId, checked: svc.enable });
  auto.addEventListener('change', async () => {
    try { await busy('Saving…', () => rpc.call('service.update', 'ssh', { enable: auto.checked })); toast('Saved'); } catch (e) { auto.checked = !auto.checked; toastError(e); }
  });

  const state = card('SSH service', [
    btn('Start', () => control('START'), '', { id: 'svc-start', disabled: svc.state === 'RUNNING' }),
    btn('Stop', () => control('STOP'), 'secondary', { id: 'svc-stop', disabled: svc.state !== 'RUNNING' }),
    btn('Restart', () => control('RESTART'), 'secondary', { id: 'svc-restart' }),
  ], h('div', {},
    h('dl', { class: 'kv' },
      h('dt', {}, 'State'), h('dd', {}, h('span', { class: `badge ${svc.state}`, id: 'svc-state' }, svc.state)),
      h('dt', {}, 'PIDs'), h('dd', {}, (svc.pids || []).join(', ') || '—')),
    h('div', { class: 'check-row' }, auto, h('label', { for: autoId, class: 'inline' }, 'Start automatically'))));

  const hostKeys = card('Host keys', [], table([
    { label: 'Type', key: 'type' },
    { label: 'Fingerprint', key: 'fingerprint', cls: 'mono' },
  ], cfg.host_keys || [], 'No host keys yet (they are created on first start).'));

  const fields = [
    { name: 'tcpport', label: 'TCP Port', type: 'number', attrs: { min: 1, max: 65535 } },
    { name: 'bindiface', label: 'Bind Interfaces (none selected = all)', type: 'multiselect', options: ifaceOpts },
    { name: 'password_login_groups', label: 'Password Login Groups (comma-separated)' },
    { name: 'passwordauth', label: 'Allow Password Authentication', type: 'checkbox' },
    { name: 'kerberosauth', label: 'Allow Kerberos Authentication', type: 'checkbox' },
    { name: 'tcpfwd', label: 'Allow TCP Port Forwarding', type: 'checkbox' },
    { name: 'compression', label: 'Compress Connections', type: 'checkbox' },
    { name: 'sftp_log_level', label: 'SFTP Log Level', type: 'select', options: SFTP_LEVELS.map((x) => [x, x || '(default)']) },
    { name: 'sftp_log_facility', label: 'SFTP Log Facility', type: 'select', options: SFTP_FACILITIES.map((x) => [x, x || '(default)']) },
    { name: 'weak_ciphers', label: 'Weak Ciphers', type: 'multiselect', options: [['AES128-CBC', 'AES128-CBC'], ['NONE', 'NONE']] },
    { name: 'options', label: 'Auxiliary Parameters (sshd_config lines)', type: 'textarea', rows: 5 },
  ];
  const f = buildForm(fields, { ...cfg, password_login_groups: (cfg.password_login_groups || []).join(', ') });
  const formErr = h('p', { class: 'error', role: 'alert' });
  f.el.append(formErr, h('div', { class: 'row-buttons' }, h('button', { type: 'submit', id: 'ssh-save' }, 'Save')));
  f.el.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    formErr.textContent = '';
    f.clearErrors();
    const v = f.values();
    v.password_login_groups = v.password_login_groups.split(',').map((s) => s.trim()).filter(Boolean);
    try {
      await busy('Checking and applying the configuration…', () => rpc.call('ssh.update', v));
      toast('SSH configuration saved');
      route();
    } catch (e) { formErr.textContent = f.showError(e); }
  });

  view.replaceChildren(h('h1', {}, 'System › Services › SSH'), state, card('Configuration', [], f.el), hostKeys);
}

async function waitJob(id) {
  for (let i = 0; i < 600; i++) {
    const jobs = await rpc.call('core.get_jobs', [['id', '=', id]]);
    const j = jobs[0];
    if (j && j.state !== 'RUNNING' && j.state !== 'WAITING') return j;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`Job ${id} is still running`);
}

// ---------------------------------------------------------------- Audit log
async function viewAudit(view) {
  const rows = await rpc.call('audit.query', [], { order_by: ['-audit_id'], limit: 200 });
  const when = (r) => {
    const ms = r.timestamp && r.timestamp.$date ? r.timestamp.$date : (r.message_timestamp || 0) * 1000;
    return new Date(ms).toLocaleString();
  };
  const what = (r) => (r.event_data && (r.event_data.description || r.event_data.method)) || '';
  view.replaceChildren(h('h1', {}, 'Audit log'), card('Newest 200 events', [btn('Refresh', () => route())], table([
    { label: 'Time', render: when },
    { label: 'User', key: 'username' },
    { label: 'Address', key: 'address' },
    { label: 'Event', key: 'event' },
    { label: 'Description', render: (r) => [what(r), r.event_data && r.event_data.error ? h('div', { class: 'error' }, String(r.event_data.error)) : null] },
    { label: 'Result', render: (r) => h('span', { class: `badge ${r.success ? 'ok' : 'fail'}` }, r.success ? 'success' : 'failure') },
  ], rows, 'No events.')));
}

// ---------------------------------------------------------------- routing and login
const ROUTES = {
  '#/credentials/backup': ['backup', viewBackup],
  '#/credentials/users': ['users', viewUsers],
  '#/system/services/ssh': ['ssh', viewSsh],
  '#/audit': ['audit', viewAudit],
};

let routeSeq = 0;
async function route() {
  if (!rpc.user) return;
  const [nav, fn] = ROUTES[location.hash] || ROUTES['#/credentials/backup'];
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === nav);
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const seq = ++routeSeq;
  const view = h('div', { id: `view-${nav}` }, h('p', { class: 'empty' }, 'Loading…'));
  $('view').replaceChildren(view);
  try {
    await fn(view);
  } catch (e) {
    if (seq === routeSeq) view.replaceChildren(h('p', { class: 'error', role: 'alert' }, `Could not load this page: ${errText(e)}`));
  }
}

function showLogin(message) {
  $('topbar').hidden = true;
  $('view').replaceChildren();
  $('login').hidden = false;
  $('login-creds').hidden = false;
  $('login-otp-box').hidden = true;
  $('login-otp').value = '';
  $('login-password').value = '';
  $('login-error').textContent = message || '';
  $('login-submit').textContent = 'Log in';
  $('login-username').focus();
}

// Nothing of the session stays in the page: dialogs may hold a token or a
// half-typed password.
function clearSessionUi() {
  const dlg = $('modal');
  if (dlg.open) dlg.close();
  dlg.replaceChildren();
  $('view').replaceChildren();
}

function sessionEnded(message) {
  rpc.user = null;
  idle.stop();
  clearSessionUi();
  rpc.close();
  showLogin(message);
}

async function loggedIn() {
  const me = await rpc.call('auth.me');
  await startTokenSession(sessionLifetime(me));
  rpc.user = me;
  rpc.methods = await rpc.call('core.get_methods');
  $('login').hidden = true;
  $('topbar').hidden = false;
  $('whoami').textContent = `Logged in as ${rpc.user.pw_name || rpc.user.username || ''}`;
  idle.start();
  if (!ROUTES[location.hash]) location.hash = '#/credentials/backup';
  await route();
  $('main').focus();
}

// ---------------------------------------------------------------- session lifetime
// After the password (and OTP) login the page swaps its connection to a
// single-use token session: the server ends a token session once it has been
// idle for the token's lifetime, like TrueNAS's UI token. The lifetime is the
// account's `preferences.lifetime` attribute (TrueNAS's "Session Timeout").
const DEFAULT_LIFETIME = 300;
const MIN_LIFETIME = 10;
const MAX_LIFETIME = 86400;

function sessionLifetime(me) {
  const v = me && me.attributes && me.attributes.preferences && me.attributes.preferences.lifetime;
  return Number.isInteger(v) && v >= MIN_LIFETIME && v <= MAX_LIFETIME ? v : DEFAULT_LIFETIME;
}

function fmtSeconds(s) {
  if (s >= 120 && s % 60 === 0) return `${s / 60} minutes`;
  return s === 1 ? '1 second' : `${s} seconds`;
}

const expiredMessage = () => `Your session expired after ${fmtSeconds(rpc.lifetime)} without activity. Log in again.`;

async function startTokenSession(lifetime) {
  const token = await rpc.call('auth.generate_token', lifetime, {}, true, true);
  if (!(await rpc.call('auth.login_with_token', token))) throw new Error('The server refused the session token. Log in again.');
  rpc.lifetime = lifetime;
}

// Activity (keys, pointer, wheel) keeps the session alive: a cheap call when
// the last one is a third of the lifetime old. Idle past the lifetime, the
// page asks the server, which ends the session and answers ENOTAUTHENTICATED.
const idle = {
  timer: null, probing: false,
  start() {
    this.stop();
    this.timer = setInterval(() => this.tick(), 500);
    for (const ev of ['keydown', 'pointerdown', 'mousemove', 'wheel', 'touchstart']) document.addEventListener(ev, idle.onActivity, { capture: true, passive: true });
  },
  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const ev of ['keydown', 'pointerdown', 'mousemove', 'wheel', 'touchstart']) document.removeEventListener(ev, idle.onActivity, { capture: true });
    this.warn(null);
  },
  remaining() { return rpc.lastCall + rpc.lifetime * 1000 - Date.now(); },
  onActivity() {
    if (!rpc.user || idle.probing) return;
    if (Date.now() - rpc.lastCall > (rpc.lifetime * 1000) / 3) idle.probe();
  },
  async probe() {
    this.probing = true;
    try { await rpc.call('auth.me'); this.warn(null); } catch (e) { /* ENOTAUTHENTICATED already ended the session */ } finally { this.probing = false; }
  },
  tick() {
    if (!rpc.user) { this.stop(); return; }
    if (rpc.pending.size) { this.warn(null); return; }
    const left = this.remaining();
    // A second of grace: the server's clock for this session starts when our call arrives.
    if (left < -1000) { if (!this.probing) this.probe(); return; }
    // A quarter of the lifetime (at most a minute), but never less than half of a short one.
    const warnAt = Math.min(60, Math.max(rpc.lifetime / 4, Math.min(10, rpc.lifetime / 2))) * 1000;
    this.warn(left <= warnAt ? Math.max(0, Math.ceil(left / 1000)) : null);
  },
  warn(secondsLeft) {
    const box = $('session-warning');
    if (!box) return;
    if (secondsLeft === null) {
      if (!box.hidden) { box.hidden = true; if (box.hidePopover && box.matches(':popover-open')) box.hidePopover(); }
      return;
    }
    // The countdown is hidden from screen readers: the alert is announced once, not every second.
    const left = `(${fmtSeconds(secondsLeft)} left)`;
    if (box.hidden) {
      box.replaceChildren('Your session is about to end for lack of activity ', h('span', { id: 'session-left', 'aria-hidden': 'true' }, left),
        '. Press a key or move the mouse to stay logged in.');
      box.hidden = false;
      if (box.showPopover) box.showPopover();
    } else {
      $('session-left').textContent = left;
    }
  },
};

function preferencesForm() {
  formModal({
    title: 'Preferences',
    fields: [
      { name: 'lifetime', label: 'Session timeout (seconds)', type: 'number', attrs: { min: MIN_LIFETIME, max: MAX_LIFETIME, step: 1, required: true },
        help: `Log out after this long without activity (TrueNAS: Session Timeout). ${MIN_LIFETIME} to ${MAX_LIFETIME} seconds; applies now.` },
    ],
    values: { lifetime: rpc.lifetime },
    onSubmit: async (v, f, m) => {
      if (!Number.isInteger(v.lifetime) || v.lifetime < MIN_LIFETIME || v.lifetime > MAX_LIFETIME) {
        f.fieldError('lifetime', `Enter a whole number of seconds from ${MIN_LIFETIME} to ${MAX_LIFETIME}.`);
        f.ctl.lifetime.focus();
        return;
      }
      await updateAttribute('preferences', (p) => { p.lifetime = v.lifetime; });
      await startTokenSession(v.lifetime);
      m.close();
      toast(`Session timeout set to ${fmtSeconds(v.lifetime)}`);
    },
  });
}

let otpStage = false;
async function onLogin(ev) {
  ev.preventDefault();
  const err = $('login-error');
  err.textContent = '';
  const submit = $('login-submit');
  submit.disabled = true;
  try {
    let r;
    if (!otpStage) {
      if (!rpc.ws) await rpc.connect();
      r = await rpc.call('auth.login_ex', { mechanism: 'PASSWORD_PLAIN', username: $('login-username').value, password: $('login-password').value });
    } else {
      r = await rpc.call('auth.login_ex', { mechanism: 'OTP_TOKEN', otp_token: $('login-otp').value.trim() });
    }
    if (r.response_type === 'SUCCESS') {
      otpStage = false;
      await loggedIn();
    } else if (r.response_type === 'OTP_REQUIRED') {
      if (otpStage) err.textContent = 'That one-time password was not accepted. Try again.';
      otpStage = true;
      $('login-creds').hidden = true;
      $('login-otp-box').hidden = false;
      $('login-otp').focus();
      submit.textContent = 'Verify';
    } else {
      const msg = { AUTH_ERR: 'Invalid username, password or one-time password.', DENIED: 'Login refused (too many failures or no access). Try again later.', EXPIRED: 'The credentials have expired.' }[r.response_type] || `Login failed: ${r.response_type}`;
      if (otpStage) { otpStage = false; rpc.close(); showLogin(msg); } else err.textContent = msg;
    }
  } catch (e) {
    // Start over on a fresh connection: never leave a half-logged-in socket behind.
    otpStage = false;
    rpc.close();
    showLogin(errText(e));
  } finally {
    submit.disabled = false;
  }
}

async function logout() {
  idle.stop();
  try { if (rpc.ws) await rpc.call('auth.logout'); } catch (e) { toastError(e); }
  rpc.user = null;
  clearSessionUi();
  rpc.close();
  showLogin('You have logged out.');
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', onLogin);
  $('logout').addEventListener('click', logout);
  $('preferences').addEventListener('click', () => preferencesForm());
  window.addEventListener('hashchange', () => route());
  $('busy').addEventListener('cancel', (ev) => ev.preventDefault());
  showLogin('');
});
