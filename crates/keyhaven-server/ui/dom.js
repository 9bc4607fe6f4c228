// DOM helpers, feedback (toasts, busy), modal dialogs, forms, downloads and tables.

import { RpcError, errText, rpc } from './rpc.js';

// ---------------------------------------------------------------- DOM helpers
export function h(tag, attrs, ...children) {
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
export const $ = (id) => document.getElementById(id);
export let uid = 0;
export const nextId = (p) => `${p}-${++uid}`;


// ---------------------------------------------------------------- feedback
export function toast(msg, cls) {
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
export const toastError = (e) => toast(typeof e === 'string' ? e : errText(e), 'error');

export let busyDepth = 0;
export async function busy(text, fn) {
  busyDepth++;
  $('busy-text').textContent = text;
  const b = $('busy');
  if (!b.open) b.showModal();
  try { return await fn(); } finally { if (--busyDepth === 0) b.close(); }
}

// ---------------------------------------------------------------- modal dialogs
export function openModal({ title, body, buttons, onClose }) {
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

export function confirmDialog(title, body, { confirmLabel = 'Confirm', danger = false, checkbox = null } = {}) {
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

export function infoDialog(title, body) {
  return new Promise((resolve) => {
    openModal({ title, body, onClose: () => resolve(), buttons: [{ label: 'Close', onClick: (m) => m.close() }] });
  });
}

// ---------------------------------------------------------------- forms
// A field: {name, label, type, options, help, show(values), value, rows, attrs, after(ctx)}
export function buildForm(fields, values) {
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
export function formModal({ title, intro, fields, values, submitLabel = 'Save', onSubmit, aliases, extra }) {
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
export function filenameFrom(resp, fallback) {
  const cd = resp.headers.get('Content-Disposition') || '';
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  return m ? decodeURIComponent(m[1]) : fallback;
}

export async function download(kp, which, passphrase) {
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

export function saveBlob(blob, name) {
  const a = h('a', { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// ---------------------------------------------------------------- tables
export function table(columns, rows, emptyText, rowAttrs) {
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

export function card(title, headButtons, content) {
  return h('section', { class: 'card', 'aria-label': title },
    h('div', { class: 'card-head' }, h('h2', {}, title), h('div', { class: 'row-buttons' }, headButtons)), content);
}

export const btn = (label, onClick, cls, attrs) => h('button', { type: 'button', class: cls || 'secondary small', onclick: onClick, ...(attrs || {}) }, label);
