// System › Cluster: the nodes sharing this keyhaven's database (one on the
// embedded SQLite database), their versions, last heartbeats and which one
// leads the scheduled work (keyhaven.cluster_status).

import { route } from './shell.js';
import { btn, card, h, table } from './dom.js';
import { rpc } from './rpc.js';

const when = (d) => (d && d.$date ? new Date(d.$date).toLocaleString() : '');

export async function viewCluster(view) {
  const st = await rpc.call('keyhaven.cluster_status');
  const backend = st.backend === 'postgresql' ? 'PostgreSQL (shared by every node)' : 'embedded SQLite (this node only)';
  const leader = st.leader ? st.leader : 'none — a failover is under way';
  view.replaceChildren(
    h('h1', {}, 'Cluster'),
    card('Nodes', [btn('Refresh', () => route())], h('div', {},
      h('p', {}, `Database: ${backend}. Leader of scheduled work (rsync schedules, audit retention): `, h('code', { id: 'cluster-leader' }, leader), '.'),
      h('p', { class: 'help' }, `Each node stamps its heartbeat every ${st.heartbeat_interval} s; a node silent for ${st.down_after} s is down.`),
      table([
        { label: 'Node', render: (n) => [h('code', {}, n.id), n.this_node ? h('span', { class: 'help' }, ' (this node)') : null] },
        { label: 'Hostname', key: 'hostname' },
        { label: 'Version', key: 'version' },
        { label: 'Address', key: 'address' },
        { label: 'Started', render: (n) => when(n.started_at) },
        { label: 'Last heartbeat', render: (n) => when(n.last_heartbeat) },
        { label: 'State', render: (n) => h('span', { class: `badge ${n.up ? 'ok' : 'fail'}` }, n.up ? 'up' : 'down') },
        { label: 'Role', render: (n) => (n.leader ? h('span', { class: 'badge RUNNING' }, 'leader') : '') },
      ], st.nodes, 'No nodes.', (n) => ({ 'data-node': n.id })),
    )),
  );
}
