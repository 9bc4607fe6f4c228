// The audit log screen.

import { route } from './shell.js';
import { btn, card, h, table } from './dom.js';
import { rpc } from './rpc.js';

// ---------------------------------------------------------------- Audit log
export async function viewAudit(view) {
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
