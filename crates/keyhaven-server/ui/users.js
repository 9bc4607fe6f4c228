// The Users screen: accounts, their public keys and two-factor login.

import { route } from './shell.js';
import { btn, busy, card, confirmDialog, download, formModal, h, infoDialog, nextId, saveBlob, table, toast, toastError, uid } from './dom.js';
import { rpc } from './rpc.js';

// ---------------------------------------------------------------- Users
export async function viewUsers(view) {
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
export function osAccountBadge(u) {
  const st = (u.os_account && u.os_account.state) || 'OK';
  if (st === 'OK') return h('span', { class: 'badge ok' }, 'ok');
  const label = st === 'MISSING' ? 'missing' : 'uid changed';
  return h('span', { class: 'badge fail', title: u.os_account.message || '', 'data-os-state': st }, label);
}

export function userForm(u) {
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

export async function enroll2fa(u) {
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
