#!/usr/bin/python
# Copyright: qlive developers
# MIT License or Apache License 2.0 (see LICENSE in the qlive repository)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: upgrade
short_description: Move running guests to the current QEMU with qlive upgrade
description:
  - Runs C(qlive upgrade --json) against one qlive agent. Each selected domain
    is live-migrated to a new QEMU process of its definition's emulator (or
    O(emulator)), one C(migrate) per domain.
  - A domain that cannot be moved keeps running on its old QEMU, with the same
    pid; the other domains are still moved. The module then fails, naming every
    domain that did not move and why.
  - In check mode it runs C(qlive upgrade --dry-run), the preflight of each
    selected domain, nothing moves; it reports V(changed) when some domain would
    move and fails when a preflight refuses.
  - The qlive CLI is run directly (no shell), with C(QLIVE_LOG=warn).
version_added: 0.1.0
author:
  - qlive developers (@qlive)
extends_documentation_fragment:
  - action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  executable:
    description:
      - The qlive CLI to run. A name without a C(/) is looked up on E(PATH)
        (and in the sbin directories); a path is used as it is.
    type: str
    default: qlive
  socket:
    description:
      - The agent's API socket, passed as C(qlive --socket).
      - Defaults to E(QLIVE_SOCKET) in the module's environment; when that is
        unset too, qlive's own default C(/run/qlive/qlive.sock) applies.
    type: path
  select:
    description:
      - Which domains to move when O(domains) is not given.
      - V(stale) (C(--stale)) every domain whose running QEMU is stale, as
        C(qlive stale) reports it; a domain whose check failed is not selected.
      - V(all) (C(--all)) every running domain.
      - Mutually exclusive with O(domains); when neither is given, V(stale).
    type: str
    choices: [stale, all]
  domains:
    description:
      - These domains (names or UUIDs), in this order, whether stale or not.
      - Mutually exclusive with O(select).
    type: list
    elements: str
  emulator:
    description:
      - The target QEMU binary for every selected domain (C(--emulator));
        absolute. By default each domain's own definition C(emulator), which
        after a package upgrade is the new binary at the same path.
    type: path
  parallel:
    description: At most this many migrations at a time (C(--parallel)).
    type: int
    default: 1
notes:
  - The module returns when every selected domain has been moved or has failed;
    each migration has qlive's default timeout (300 s).
  - Nothing selected is success with V(changed=false).
seealso:
  - module: qlive.fleet.facts
'''

EXAMPLES = r'''
- name: Move every stale guest, two at a time
  qlive.fleet.upgrade:
    parallel: 2
  register: moved

- name: Would the stale guests move? (preflight only)
  qlive.fleet.upgrade:
  check_mode: true

- name: Move two guests to a QEMU at another path
  qlive.fleet.upgrade:
    domains: [web1, web2]
    emulator: /opt/qemu-10/bin/qemu-system-x86_64
'''

RETURN = r'''
summary:
  description: The summary line of C(qlive upgrade --json), as printed.
  returned: when qlive ran the upgrade (exit 0 or 1)
  type: dict
  sample: {"dry_run": false, "failed": 1, "failed_domains": ["c"], "parallel": 2, "selected": 3, "succeeded": 2, "wall_ms": 2315}
results:
  description:
    - One entry per selected domain, in the order they finished; the line
      C(qlive upgrade --json) printed for it (see docs/protocol.md in qlive),
      plus C(changed) and C(failed).
  returned: when qlive ran the upgrade
  type: list
  elements: dict
  contains:
    name:
      description: The domain.
      type: str
    result:
      description: V(success) (moved), V(ok) (check mode, would move) or V(failed).
      type: str
    changed:
      description: V(true) if the domain moved (check mode, would move).
      type: bool
    failed:
      description: V(true) if the domain did not move and keeps running on its old QEMU.
      type: bool
    error:
      description: Why it did not move (only when failed).
      type: str
moved:
  description: The domains moved to a new QEMU (check mode, that would move), sorted.
  returned: when qlive ran the upgrade
  type: list
  elements: str
failed_domains:
  description: The domains that did not move and keep running on their old QEMU, sorted.
  returned: when qlive ran the upgrade
  type: list
  elements: str
unchecked:
  description:
    - With O(select=stale), the running domains whose stale check failed; they
      were not upgraded and make the module fail.
  returned: when qlive ran the upgrade
  type: list
  elements: str
errors:
  description: For each failed domain, its error.
  returned: when qlive ran the upgrade
  type: dict
  sample: {"c": "migrating domain c: required-feature hook /etc/qlive/hooks.d/50-port failed in phase prepare: exit status: 1: no port for c"}
cmd:
  description: The command run.
  returned: always
  type: list
  elements: str
rc:
  description:
    - The exit code of C(qlive upgrade) (0 all moved; 1 some failed or could not
      be checked; 2 not run, or the agent was lost during the run).
  returned: always
  type: int
stderr:
  description: What qlive printed on stderr.
  returned: always
  type: str
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qlive.fleet.plugins.module_utils.qlive import common_argument_spec, parse_json_lines, run_qlive


def main():
    spec = common_argument_spec()
    spec.update(
        select=dict(type='str', choices=['stale', 'all']),
        domains=dict(type='list', elements='str'),
        emulator=dict(type='path'),
        parallel=dict(type='int', default=1),
    )
    module = AnsibleModule(
        argument_spec=spec,
        mutually_exclusive=[('select', 'domains')],
        supports_check_mode=True,
    )
    p = module.params
    if p['parallel'] < 1:
        module.fail_json(msg='parallel must be at least 1, got %d' % p['parallel'])
    if p['emulator'] is not None and not p['emulator'].startswith('/'):
        module.fail_json(msg='emulator must be an absolute path, got %s' % p['emulator'])
    if p['domains'] is not None and not p['domains']:
        module.fail_json(msg='domains is empty: give at least one name, or use select')

    args = ['upgrade', '--json', '--parallel', str(p['parallel'])]
    if p['emulator']:
        args += ['--emulator', p['emulator']]
    if module.check_mode:
        args.append('--dry-run')
    if p['domains']:
        args += ['--'] + p['domains']  # names last; `--` so none is read as an option
    elif p['select'] == 'all':
        args.append('--all')
    else:
        args.append('--stale')

    cmd, rc, out, err = run_qlive(module, args)
    lines = []
    for line in out.splitlines():
        try:
            lines.extend(parse_json_lines(line))
        except ValueError:
            if rc in (0, 1):
                module.fail_json(msg='qlive upgrade printed a line that is not JSON: %s' % line,
                                 cmd=cmd, rc=rc, stdout=out, stderr=err)
    summaries = [x['summary'] for x in lines if isinstance(x, dict) and 'summary' in x]
    if len(summaries) != 1:
        module.fail_json(msg='qlive upgrade was not run (exit %d): %s' % (rc, err.strip()),
                         cmd=cmd, rc=rc, stdout=out, stderr=err)
    summary = summaries[0]
    ok_result = 'ok' if module.check_mode else 'success'
    results = []
    for x in lines:
        if isinstance(x, dict) and 'summary' not in x:
            x = dict(x)
            x['changed'] = x.get('result') == ok_result
            x['failed'] = x.get('result') == 'failed'
            results.append(x)
    moved = sorted(x['name'] for x in results if x['changed'])
    failed = sorted(x['name'] for x in results if x['failed'])
    errors = dict((x['name'], x.get('error')) for x in results if x['failed'])
    unchecked = sorted(summary.get('unchecked') or [])
    ret = dict(
        changed=bool(moved),
        summary=summary,
        results=results,
        moved=moved,
        failed_domains=failed,
        errors=errors,
        unchecked=unchecked,
        cmd=cmd,
        rc=rc,
        stderr=err,
    )
    verb = 'would move' if module.check_mode else 'moved'
    if rc != 0 or failed or unchecked:
        why = []
        if failed:
            why.append('%d of %d domain(s) could not be moved and keep running on their old QEMU: %s' % (
                len(failed), summary.get('selected', len(results)),
                '; '.join('%s (%s)' % (n, errors[n]) for n in failed)))
        if unchecked:
            why.append('could not tell whether these are stale, not upgraded: %s' % ', '.join(unchecked))
        if rc == 2:
            why.append('the agent could not be reached during the run, some outcomes are unknown: %s' % err.strip())
        if not why:
            why.append('qlive upgrade exited %d: %s' % (rc, err.strip()))
        if moved:
            why.append('%s: %s' % (verb, ', '.join(moved)))
        module.fail_json(msg='; '.join(why), **ret)
    if not results:
        ret['msg'] = 'nothing to upgrade'
    else:
        ret['msg'] = '%s %d of %d domain(s): %s' % (verb, len(moved), summary.get('selected', len(results)), ', '.join(moved))
    module.exit_json(**ret)


if __name__ == '__main__':
    main()
