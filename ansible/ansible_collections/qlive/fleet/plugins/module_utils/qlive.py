# Copyright: qlive developers
# MIT License or Apache License 2.0 (see LICENSE in the qlive repository)
"""Running the qlive CLI from the qlive.fleet modules.

The modules never go through a shell: the command is an argument list given
to AnsibleModule.run_command, and qlive's own --json output is parsed.
"""

from __future__ import annotations

import json
import os

from ansible.module_utils.basic import env_fallback


def common_argument_spec():
    """The options every qlive.fleet module takes."""
    return dict(
        executable=dict(type='str', default='qlive'),
        socket=dict(type='path', fallback=(env_fallback, ['QLIVE_SOCKET'])),
    )


def qlive_command(module, args):
    """The argument list that runs qlive with the module's socket."""
    exe = module.params['executable']
    if os.sep not in exe:
        try:
            exe = module.get_bin_path(exe, required=True)
        except ValueError as e:  # newer get_bin_path raises instead of failing
            module.fail_json(msg='qlive executable not found: %s' % e)
    elif not os.access(exe, os.X_OK):
        module.fail_json(msg='qlive executable %s does not exist or is not executable' % exe)
    cmd = [exe]
    if module.params.get('socket'):
        cmd += ['--socket', module.params['socket']]
    return cmd + list(args)


def run_qlive(module, args):
    """Run qlive; return (cmd, rc, stdout, stderr). Never raises."""
    cmd = qlive_command(module, args)
    # QLIVE_LOG=warn: only warnings and errors on stderr, whatever the caller's environment says.
    rc, out, err = module.run_command(cmd, environ_update={'QLIVE_LOG': 'warn'})
    return cmd, rc, out, err


def run_json(module, args):
    """Run a read-only `qlive ... --json` and return its parsed result, or fail the module."""
    cmd, rc, out, err = run_qlive(module, args)
    if rc != 0:
        module.fail_json(msg='%s failed (exit %d): %s' % (' '.join(args), rc, err.strip()),
                         cmd=cmd, rc=rc, stdout=out, stderr=err)
    try:
        return json.loads(out)
    except ValueError as e:
        module.fail_json(msg='%s printed no JSON: %s' % (' '.join(args), e),
                         cmd=cmd, rc=rc, stdout=out, stderr=err)


def parse_json_lines(text):
    """One JSON value per non-empty line, as `qlive upgrade --json` prints them."""
    values = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            values.append(json.loads(line))
    return values
