// The SSH service screen: settings, start/stop, host keys.

import { route } from './shell.js';
import { btn, buildForm, busy, card, h, nextId, table, toast, toastError } from './dom.js';
import { rpc } from './rpc.js';

// ---------------------------------------------------------------- SSH service
export const SFTP_LEVELS = ['', 'QUIET', 'FATAL', 'ERROR', 'INFO', 'VERBOSE', 'DEBUG', 'DEBUG2', 'DEBUG3'];
export const SFTP_FACILITIES = ['', 'DAEMON', 'USER', 'AUTH', 'LOCAL0', 'LOCAL1', 'LOCAL2', 'LOCAL3', 'LOCAL4', 'LOCAL5', 'LOCAL6', 'LOCAL7'];

export async function viewSsh(view) {
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

export async function waitJob(id) {
  for (let i = 0; i < 600; i++) {
    const jobs = await rpc.call('core.get_jobs', [['id', '=', id]]);
    const j = jobs[0];
    if (j && j.state !== 'RUNNING' && j.state !== 'WAITING') return j;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`Job ${id} is still running`);
}
