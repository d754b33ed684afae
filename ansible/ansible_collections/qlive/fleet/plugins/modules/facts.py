#!/usr/bin/python
# Copyright: qlive developers
# MIT License or Apache License 2.0 (see LICENSE in the qlive repository)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: facts
short_description: Gather facts about the guests of a qlive agent
description:
  - Runs C(qlive list --json) and C(qlive stale --json) against one qlive agent
    and returns, as the C(qlive) fact, every domain with its state, whether its
    running QEMU is stale and why, and the QEMU version it runs.
  - Read-only; runs the same in check mode.
  - The qlive CLI is run directly (no shell), with C(QLIVE_LOG=warn).
version_added: 0.1.0
author:
  - qlive developers (@qlive)
extends_documentation_fragment:
  - action_common_attributes
  - action_common_attributes.facts
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
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
notes:
  - The caller must be allowed to use the API (root or a member of the group
    C(qlive)).
seealso:
  - module: qlive.fleet.upgrade
'''

EXAMPLES = r'''
- name: Gather qlive facts
  qlive.fleet.facts:

- name: Show the stale guests and why
  ansible.builtin.debug:
    msg: "{{ item.name }}: {{ item.reasons | map(attribute='text') | join(', ') }}"
  loop: "{{ ansible_facts.qlive.domains | selectattr('stale') }}"

- name: Another agent, another qlive binary
  qlive.fleet.facts:
    executable: /usr/local/bin/qlive
    socket: /run/qlive-test/qlive.sock
'''

RETURN = r'''
ansible_facts:
  description: Facts to add to the host's facts.
  returned: always
  type: dict
  contains:
    qlive:
      description: What the agent reports.
      returned: always
      type: dict
      contains:
        socket:
          description: The socket asked, or V(null) for qlive's default.
          type: str
          sample: /run/qlive/qlive.sock
        domains:
          description: Every defined domain, sorted by name.
          type: list
          elements: dict
          contains:
            name:
              description: The domain's name.
              type: str
            uuid:
              description: The domain's UUID.
              type: str
            state:
              description:
                - As C(qlive list) reports it, for example V(running),
                  V(paused), V(shut-off), V(unreachable), V(crashed).
              type: str
            domid:
              description: The running instance's domid, or V(null).
              type: int
            pid:
              description: The running QEMU's pid, or V(null).
              type: int
            stale:
              description:
                - V(true) if the running QEMU runs files that were replaced or
                  deleted on disk since it started; V(null) when the domain
                  is not running or the check failed (see RV(ansible_facts.qlive.domains[].stale_error)).
              type: bool
            reasons:
              description: One C({kind, path, text}) per changed file (empty when current).
              type: list
              elements: dict
            stale_error:
              description: Why the stale check failed, or V(null).
              type: str
            qemu_version:
              description: The running QEMU's version (C(major.minor.micro)), or V(null).
              type: str
              sample: 7.2.22
            emulator:
              description: The emulator path the running instance was started from, or V(null).
              type: str
        running:
          description: Names of the domains with a running QEMU (those C(qlive stale) checks).
          type: list
          elements: str
        stale:
          description: Names of the stale domains, which C(qlive upgrade --stale) selects.
          type: list
          elements: str
        unknown:
          description: Names of the running domains whose stale check failed.
          type: list
          elements: str
        qemu_versions:
          description: For each QEMU version running, the names of the domains on it.
          type: dict
          sample: {"7.2.22": ["db1"], "10.0.2": ["web1", "web2"]}
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qlive.fleet.plugins.module_utils.qlive import common_argument_spec, run_json


def gather(module):
    listed = run_json(module, ['list', '--json'])
    checked = run_json(module, ['stale', '--json'])
    if not isinstance(listed, list) or not isinstance(checked, list):
        module.fail_json(msg='unexpected output of qlive list/stale: %r / %r' % (listed, checked))
    by_name = dict((d.get('name'), d) for d in checked)
    domains = []
    qemu_versions = {}
    for d in sorted(listed, key=lambda d: d.get('name')):
        s = by_name.get(d.get('name'))
        # a domain stale reports on runs a QEMU (the list's state may be
        # paused or a migration state; the check is about the process)
        if s is not None and s.get('pid') != d.get('pid'):
            s = None  # it moved between the two calls: no verdict
        entry = dict(
            name=d.get('name'),
            uuid=d.get('uuid'),
            state=d.get('state'),
            domid=d.get('domid'),
            pid=d.get('pid'),
            stale=None,
            reasons=[],
            stale_error=None,
            qemu_version=None,
            emulator=None,
        )
        if s is not None:
            entry.update(
                stale=None if s.get('error') else bool(s.get('stale')),
                reasons=s.get('reasons') or [],
                stale_error=s.get('error'),
                qemu_version=s.get('qemu_version'),
                emulator=s.get('emulator'),
            )
            if s.get('qemu_version'):
                qemu_versions.setdefault(s['qemu_version'], []).append(entry['name'])
        domains.append(entry)
    return dict(
        socket=module.params.get('socket'),
        domains=domains,
        running=[d['name'] for d in domains if d['name'] in by_name],
        stale=[d['name'] for d in domains if d['stale'] is True],
        unknown=[d['name'] for d in domains if d['stale_error']],
        qemu_versions=qemu_versions,
    )


def main():
    module = AnsibleModule(argument_spec=common_argument_spec(), supports_check_mode=True)
    module.exit_json(changed=False, ansible_facts=dict(qlive=gather(module)))


if __name__ == '__main__':
    main()
