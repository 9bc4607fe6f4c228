// Data Protection › Rsync Tasks: list, add/edit, run now with live progress, the last run's log.

import { route } from './shell.js';
import { btn, card, confirmDialog, formModal, h, infoDialog, openModal, table, toast, toastError } from './dom.js';
import { errText, rpc } from './rpc.js';

const CRON = ['minute', 'hour', 'dom', 'month', 'dow'];
const BOOLS = [
  ['recursive', 'Recursive'], ['times', 'Preserve times'], ['compress', 'Compress'], ['archive', 'Archive mode'],
  ['delete', 'Delete files missing on the source'], ['quiet', 'Quiet (no output in the log)'],
  ['preserveperm', 'Preserve permissions'], ['preserveattr', 'Preserve extended attributes'], ['delayupdates', 'Delay updates'],
];

const fmtDate = (d) => (d && d.$date ? new Date(d.$date).toLocaleString() : '');
const remoteOf = (t) => {
  if (t.mode === 'MODULE') return `${t.remotehost || ''}::${t.remotemodule || ''}`;
  const c = t.ssh_credentials;
  const host = c && c.attributes && c.attributes.host ? `${c.attributes.username}@${c.attributes.host}` : (c ? c.name : `${t.user}@${t.remotehost || ''}`);
  return `${host}:${t.remotepath}`;
};
const scheduleText = (s) => CRON.map((k) => s[k]).join(' ');

function lastRun(t) {
  if (!t.job) return h('span', { class: 'badge' }, 'never run');
  const cls = { SUCCESS: 'ok', FAILED: 'fail', RUNNING: '' }[t.job.state] || '';
  return [h('span', { class: `badge ${cls}`, title: t.job.error || '' }, t.job.state), ' ', fmtDate(t.job.time_finished || t.job.time_started)];
}

export async function viewRsync(view) {
  const [tasks, conns] = await Promise.all([
    rpc.call('rsynctask.query', [], { order_by: ['id'] }),
    rpc.call('keychaincredential.query', [['type', '=', 'SSH_CREDENTIALS']]),
  ]);
  view.replaceChildren(h('h1', {}, 'Rsync Tasks'), card('Rsync Tasks', [
    btn('Add', () => editTask(null, conns), 'small', { id: 'rsync-add' }),
    btn('Refresh', () => route()),
  ], table([
    { label: 'Path', key: 'path' },
    { label: 'Remote', render: remoteOf },
    { label: 'Direction', key: 'direction' },
    { label: 'Schedule', render: (t) => h('code', {}, scheduleText(t.schedule)) },
    { label: 'Enabled', render: (t) => h('input', { type: 'checkbox', checked: t.enabled, 'aria-label': `Enabled: ${t.path}`,
      onchange: (ev) => setEnabled(t, ev.target) }) },
    { label: 'Last run', render: lastRun },
    { label: '', render: (t) => h('div', { class: 'row-buttons' },
      btn('Run Now', () => runNow(t), 'small', { 'data-run': t.id }),
      btn('Log', () => showLog(t), undefined, { 'data-log': t.id }),
      btn('Edit', () => editTask(t, conns), undefined, { 'data-edit': t.id }),
      btn('Delete', () => deleteTask(t), 'danger small', { 'data-delete': t.id })) },
  ], tasks, 'No rsync tasks yet. Add one to back up a directory over an SSH connection.', (t) => ({ 'data-task': t.id }))));
}

async function setEnabled(t, box) {
  try {
    await rpc.call('rsynctask.update', t.id, { enabled: box.checked, validate_rpath: false });
    toast(`${t.path}: ${box.checked ? 'enabled' : 'disabled'}`);
  } catch (e) {
    box.checked = !box.checked;
    toastError(e);
  }
}

function editTask(t, conns) {
  const v = t ? { ...t, ...t.schedule, ssh_credentials: t.ssh_credentials ? String(t.ssh_credentials.id) : '', extra: (t.extra || []).join('\n') } : {
    mode: 'SSH', direction: 'PUSH', user: 'root', enabled: true, minute: '00', hour: '*', dom: '*', month: '*', dow: '*',
    recursive: true, times: true, compress: true, delayupdates: true, validate_rpath: true, ssh_credentials: conns[0] ? String(conns[0].id) : '',
  };
  const ssh = (x) => x.mode === 'SSH';
  const noConn = (x) => x.mode === 'MODULE' || !x.ssh_credentials;
  formModal({
    title: t ? `Edit Rsync Task ${t.path}` : 'Add Rsync Task',
    values: v,
    fields: [
      { name: 'path', label: 'Path', help: 'The local directory (absolute; not inside keyhaven\'s data directory).', attrs: { required: true } },
      { name: 'user', label: 'User', help: 'The account the run uses: files it writes belong to it.', attrs: { required: true } },
      { name: 'direction', label: 'Direction', type: 'select', options: [['PUSH', 'Push (local → remote)'], ['PULL', 'Pull (remote → local)']] },
      { name: 'mode', label: 'Rsync mode', type: 'select', options: [['SSH', 'SSH'], ['MODULE', 'Module (rsync daemon)']] },
      { name: 'ssh_credentials', label: 'SSH connection', type: 'select', show: ssh,
        options: [['', '— none: the user\'s own key and known_hosts —'], ...conns.map((c) => [String(c.id), c.name])],
        help: 'The connection\'s key is served to the run from memory and its host key is pinned.' },
      { name: 'remotehost', label: 'Remote host', show: noConn },
      { name: 'remoteport', label: 'Remote port', type: 'number', show: noConn, attrs: { min: 1, max: 65535 } },
      { name: 'remotemodule', label: 'Remote module', show: (x) => x.mode === 'MODULE' },
      { name: 'remotepath', label: 'Remote path', show: ssh },
      { name: 'validate_rpath', label: 'Check that the remote path exists', type: 'checkbox', show: ssh },
      { name: 'desc', label: 'Description' },
      ...CRON.map((k) => ({ name: k, label: { minute: 'Minute', hour: 'Hour', dom: 'Day of month', month: 'Month', dow: 'Day of week' }[k] })),
      ...BOOLS.map(([name, label]) => ({ name, label, type: 'checkbox' })),
      { name: 'extra', label: 'Extra options', type: 'textarea', rows: 2, help: 'One rsync option per line, e.g. --exclude=*.tmp' },
      { name: 'enabled', label: 'Enabled', type: 'checkbox' },
    ],
    aliases: Object.fromEntries(CRON.map((k) => [k, k])),
    onSubmit: async (x, f, m) => {
      const body = {
        path: x.path, user: x.user, direction: x.direction, mode: x.mode, desc: x.desc, enabled: x.enabled,
        schedule: Object.fromEntries(CRON.map((k) => [k, x[k]])),
        extra: x.extra.split('\n').map((s) => s.trim()).filter(Boolean),
        ...Object.fromEntries(BOOLS.map(([n]) => [n, x[n]])),
      };
      if (x.mode === 'SSH') {
        body.remotepath = x.remotepath;
        body.validate_rpath = x.validate_rpath;
        body.ssh_credentials = x.ssh_credentials ? Number(x.ssh_credentials) : null;
      } else {
        body.remotemodule = x.remotemodule;
        body.ssh_credentials = null;
      }
      if (noConn(x)) { body.remotehost = x.remotehost || null; body.remoteport = x.remoteport; }
      if (t) await rpc.call('rsynctask.update', t.id, body); else await rpc.call('rsynctask.create', body);
      m.close();
      toast(t ? 'Rsync task saved' : 'Rsync task added');
      route();
    },
  });
}

async function deleteTask(t) {
  if (!(await confirmDialog('Delete Rsync Task', `Delete the task for ${t.path}? Files already copied stay where they are.`, { confirmLabel: 'Delete', danger: true }))) return;
  try { await rpc.call('rsynctask.delete', t.id); toast('Rsync task deleted'); route(); } catch (e) { toastError(e); }
}

// Run now: the job's progress and log, live, until it ends.
async function runNow(t) {
  let job;
  try { job = await rpc.call('rsynctask.run', t.id); } catch (e) { toastError(e); return; }
  const bar = h('progress', { id: 'rsync-progress', max: 100, value: 0 });
  const state = h('p', { id: 'rsync-state', role: 'status' }, 'Starting…');
  const log = h('pre', { id: 'rsync-log', class: 'log' });
  let open = true;
  const m = openModal({
    title: `Run ${t.path}`, body: h('div', {}, bar, state, log),
    onClose: () => { open = false; route(); },
    buttons: [{ label: 'Close', id: 'rsync-close', onClick: (mm) => mm.close() }],
  });
  while (open) {
    let j;
    try { [j] = await rpc.call('core.get_jobs', [['id', '=', job]]); } catch (e) { m.setError(errText(e)); return; }
    if (!j) return;
    bar.value = j.progress.percent || 0;
    log.textContent = j.logs_excerpt || '';
    if (j.state === 'RUNNING') state.textContent = `${Math.round(j.progress.percent || 0)}% ${j.progress.description || ''}`;
    else {
      state.textContent = j.state === 'SUCCESS' ? 'Finished successfully.' : 'Failed.';
      state.dataset.state = j.state;
      if (j.error) m.setError(j.error);
      return;
    }
    await new Promise((r) => setTimeout(r, 400));
  }
}

async function showLog(t) {
  try {
    const text = await rpc.call('rsynctask.last_log', t.id);
    await infoDialog(`Last run of ${t.path}`, h('div', {},
      t.job && t.job.error ? h('p', { class: 'error' }, t.job.error) : null,
      h('pre', { class: 'log', id: 'rsync-last-log' }, text || 'No run yet.')));
  } catch (e) { toastError(e); }
}
