// System › General › Manage Configuration: save an encrypted backup
// (config.save → download link) and restore one (POST /_upload config.upload,
// then the server restarts in place onto it).

import { btn, busy, card, filenameFrom, formModal, h, saveBlob, toast } from './dom.js';
import { rpc } from './rpc.js';
import { waitJob } from './ssh.js';

const PASS_HELP = 'At least 8 characters. The file holds every private key: keep the passphrase apart from it. Without it the file cannot be restored.';

export async function viewConfig(view) {
  const canWrite = rpc.has('config.save');
  view.replaceChildren(
    h('h1', {}, 'Manage Configuration'),
    card('Configuration backup', [
      btn('Download Config', () => saveConfig(), 'primary small', { id: 'config-save', disabled: !canWrite }),
      btn('Upload Config', () => uploadConfig(), 'secondary small', { id: 'config-upload', disabled: !canWrite }),
    ], h('div', {},
      h('p', {}, 'Download Config saves the database, the master key, the SSH host keys and the TLS certificate in one file encrypted with a passphrase (age format: `age -d` opens it).'),
      h('p', {}, 'Upload Config restores such a file: keyhaven checks it completely, keeps the current state aside, then restarts onto the restored one. You will have to log in again.'),
      canWrite ? null : h('p', { class: 'help' }, 'Only full admins can save or restore the configuration.'),
    )),
  );
}

function passFields(confirm) {
  const fields = [{ name: 'passphrase', label: 'Passphrase', type: 'password', help: PASS_HELP }];
  if (confirm) fields.push({ name: 'confirm', label: 'Confirm passphrase', type: 'password' });
  return fields;
}

function saveConfig() {
  formModal({
    title: 'Download Config',
    intro: h('p', {}, 'The backup is encrypted with this passphrase.'),
    fields: passFields(true),
    submitLabel: 'Save',
    onSubmit: async (v, f, m) => {
      if (v.passphrase.length < 8) { f.fieldError('passphrase', 'Use at least 8 characters'); return; }
      if (v.passphrase !== v.confirm) { f.fieldError('confirm', 'The passphrases differ'); return; }
      await busy('Writing the encrypted backup…', async () => {
        const job = await waitJob(await rpc.call('config.save', { passphrase: v.passphrase }));
        if (job.state !== 'SUCCESS') throw new Error(job.error || 'Saving the configuration failed');
        const token = await rpc.call('auth.generate_token', 60, {}, true, true);
        const resp = await fetch(`${job.result}?auth_token=${encodeURIComponent(token)}`, { credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer' });
        if (!resp.ok) throw new Error(`Download failed (${resp.status}): ${(await resp.text()).trim()}`);
        saveBlob(await resp.blob(), filenameFrom(resp, 'keyhaven-config.age'));
      });
      m.close();
      toast('Configuration saved');
    },
  });
}

function uploadConfig() {
  const file = h('input', { type: 'file', id: 'config-file', name: 'file', accept: '.age,application/octet-stream', 'aria-label': 'Backup file' });
  formModal({
    title: 'Upload Config',
    intro: h('div', {},
      h('p', {}, 'The current configuration is replaced by the one in the file; keyhaven restarts.'),
      h('div', { class: 'field' }, h('label', { for: 'config-file' }, 'Backup file'), file)),
    fields: passFields(false),
    submitLabel: 'Upload',
    onSubmit: async (v, f, m) => {
      if (!file.files.length) { m.setError('Choose the backup file'); return; }
      if (!v.passphrase) { f.fieldError('passphrase', 'Give the passphrase the backup was saved with'); return; }
      const form = new FormData();
      form.append('data', JSON.stringify({ method: 'config.upload', params: [{ passphrase: v.passphrase }] }));
      form.append('file', file.files[0]);
      const token = await rpc.call('auth.generate_token', 300, {}, true, true);
      const resp = await busy('Checking and restoring the backup…', () => fetch(`/_upload?auth_token=${encodeURIComponent(token)}`, { method: 'POST', body: form, credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer' }));
      const text = await resp.text();
      let reply = {};
      try { reply = JSON.parse(text); } catch (_) { reply = { error: text.trim() }; }
      if (!resp.ok) { m.setError(reply.error || `Upload failed (${resp.status})`); return; }
      m.close();
      toast('Configuration restored; keyhaven is restarting. Log in again in a moment.');
    },
  });
}
